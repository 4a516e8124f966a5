"""Which (model, recipe) results are out of date, and the first stage that must run again.

Every published artifact is named by a hash of its inputs (checkpoint bytes,
recipe spec and gates, toolchain, export and evaluation settings, eval text), so a
pair is up to date exactly when the artifact for its *current* inputs exists, or
when those inputs failed in a way that would repeat (a recipe that does not fit the
model, one the quantizer or the runtime refuses, one that fails its gates:
"settled"). For a stale pair we pick the earliest stage whose input changed;
declarative automation then carries the change downstream:

- the checkpoint's bytes, the exporter setting, the toolchain or the export
  settings changed -> convert the model again (export included);
- only the eval text or its token budget changed -> the float reference alone;
- the recipe's spec or gates changed -> resolve the recipe again;
- otherwise (never published, or failed otherwise) -> quantize, evaluate, publish.
"""

from dataclasses import dataclass, field

from edge_quant_pipeline.graph import MODEL_ASSETS


@dataclass(frozen=True)
class ModelState:
    current_hash: str  # of the checkpoint on disk now
    converted_hash: str | None  # data version of the last `checkpoint` materialization
    # The per-model assets whose last materialization had another code version (settings included) than now.
    changed_code: tuple[str, ...] = ()

    @property
    def assets_to_run(self) -> tuple[str, ...]:
        """What the conversion job must make again: all of it for new bytes; else what changed (a new eval text
        does not export again)."""
        if self.converted_hash != self.current_hash or "checkpoint" in self.changed_code:
            return MODEL_ASSETS
        return tuple(a for a in MODEL_ASSETS if a in self.changed_code)


def as_selection(assets: tuple[str, ...]) -> tuple[str, ...] | None:
    """The assets of a conversion as a run's asset selection: None for the whole conversion job."""
    return None if assets == MODEL_ASSETS else assets


@dataclass(frozen=True)
class RecipeState:
    current_hash: str  # of the spec in the catalog now
    resolved_hash: str | None  # data version of the last `quant_recipe` materialization


@dataclass
class RebuildPlan:
    convert: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model -> the assets it must make again
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


def plan_rebuild(
    models: dict[str, ModelState],
    recipes: dict[str, RecipeState],
    settled: set[tuple[str, str]],
    rebuild_all: bool = False,
) -> RebuildPlan:
    """``settled``: the (model, recipe) pairs published, or failed for good, with their current inputs."""
    plan = RebuildPlan()
    plan.convert = {
        m: MODEL_ASSETS if rebuild_all else state.assets_to_run
        for m, state in models.items()
        if rebuild_all or state.assets_to_run
    }
    plan.resolve = [r for r, state in recipes.items() if rebuild_all or state.resolved_hash != state.current_hash]
    plan.quantize = [
        (model, recipe)
        for model in models
        for recipe in recipes
        if (model, recipe) not in settled and model not in plan.convert and recipe not in plan.resolve
    ]
    return plan
