"""Which (model, recipe) results are out of date, and the first stage that must run again.

Every published artifact is named by a hash of its inputs (checkpoint bytes,
recipe spec, toolchain), so a pair is up to date exactly when the artifact for
its *current* inputs exists, or when those inputs failed in a way that would
repeat (a recipe that does not fit the model, one the quantizer or the runtime
refuses: "settled"). For a stale pair we pick the earliest stage whose
input changed; declarative automation then carries the change downstream:

- the checkpoint's bytes or the toolchain changed -> convert the model again;
- the recipe's spec changed                      -> resolve the recipe again;
- otherwise (never published, or failed otherwise) -> quantize, evaluate, publish.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelState:
    current_hash: str  # of the checkpoint on disk now
    converted_hash: str | None  # data version of the last `checkpoint` materialization
    converted_with_current_toolchain: bool


@dataclass(frozen=True)
class RecipeState:
    current_hash: str  # of the spec in the catalog now
    resolved_hash: str | None  # data version of the last `quant_recipe` materialization


@dataclass
class RebuildPlan:
    convert: list[str] = field(default_factory=list)
    resolve: list[str] = field(default_factory=list)
    quantize: list[tuple[str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.convert or self.resolve or self.quantize)

    def affected_pairs(self, models: list[str], recipes: list[str]) -> list[tuple[str, str]]:
        """Every pair the plan rebuilds, including those downstream of a conversion or a recipe."""
        return [
            (m, r) for m in models for r in recipes if m in self.convert or r in self.resolve or (m, r) in self.quantize
        ]


def model_is_stale(state: ModelState) -> bool:
    return state.converted_hash != state.current_hash or not state.converted_with_current_toolchain


def plan_rebuild(
    models: dict[str, ModelState],
    recipes: dict[str, RecipeState],
    settled: set[tuple[str, str]],
    rebuild_all: bool = False,
) -> RebuildPlan:
    """``settled``: the (model, recipe) pairs published, or failed for good, with their current inputs."""
    plan = RebuildPlan()
    plan.convert = [m for m, state in models.items() if rebuild_all or model_is_stale(state)]
    plan.resolve = [r for r, state in recipes.items() if rebuild_all or state.resolved_hash != state.current_hash]
    plan.quantize = [
        (model, recipe)
        for model in models
        for recipe in recipes
        if (model, recipe) not in settled and model not in plan.convert and recipe not in plan.resolve
    ]
    return plan
