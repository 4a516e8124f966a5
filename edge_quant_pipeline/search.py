"""Recipe search under a quality budget: per model, the smallest per-component, per-block recipe whose mean KL (or
perplexity ratio) against the float model stays within the budget the recipe declares.

1. **Sensitivity.** Each component of each block (the embedding, with a tied LM head; each block's attention and
   feed-forward; a separate LM head) is quantized alone with each candidate scheme, everything else float, and
   scored against the stored float reference on the first ``sensitivity_tokens`` of the eval text: the KL (or
   log perplexity ratio) it adds, and the bytes its weights take in that file. One quantize and one scoring pass
   each. Results are cached per (checkpoint, scheme) in the work folder, so another budget or candidate list
   reuses them.
2. **Choice.** Treating the components' added costs as additive, the assignment with the fewest weight bytes
   whose summed cost stays within the target: exact, by dynamic programming over the target cut into
   ``STEPS`` steps, each component's cost rounded up.
3. **Verification.** The chosen recipe is quantized and scored on the whole eval text, as its evaluation will
   score it. Costs do not add up exactly (errors interact), so if the verified value breaks the budget the
   target is scaled by budget / verified and the choice made again, at most ``MAX_ROUNDS`` times.

What is scored, exactly, is what ``evaluate/metrics.py`` scores (every position of each window, KL(float ||
candidate)); the eval text serves both the search and the published evaluation, so the budget is met on the
text it was chosen on.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_quant_pipeline.atomic import write_atomically
from edge_quant_pipeline.evaluate.evaluation import score_windows
from edge_quant_pipeline.evaluate.metrics import Fidelity
from edge_quant_pipeline.evaluate.reference import FloatReference
from edge_quant_pipeline.quantize.apply import quantize_model
from edge_quant_pipeline.quantize.recipes import PER_BLOCK_COMPONENTS, Recipe, RecipeError, SearchSpec
from edge_quant_pipeline.quantize.schemes import Op
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe, block_size, embedder_quantizer_recipe
from edge_quant_pipeline.runtime.session import InterpreterSession
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.weights import WeightTensor, inspect_tflite

STEPS = 1000
MAX_ROUNDS = 4
# What each budget bounds, read off a Fidelity: the summable cost of one component (KL is additive to first order;
# a perplexity ratio multiplies, so its logarithm adds).
_COSTS: dict[str, Callable[[float, float], float]] = {  # (mean KL, perplexity ratio) -> cost
    "max_mean_kl": lambda mean_kl, ratio: mean_kl,
    "max_perplexity_ratio": lambda mean_kl, ratio: math.log(ratio),
}


class SearchError(RuntimeError):
    """No assignment of the candidate schemes meets the budget; the message says what came closest."""


@dataclass(frozen=True)
class Component:
    """A part of the model the search gives a scheme: its recipe field and block."""

    name: str  # embedding | attention | feedforward | lm_head
    block: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.block is None else f"{self.name}.{self.block}"

    def recipe(self, name: str, scheme: str) -> Recipe:
        """A recipe that quantizes this component alone."""
        return Recipe(name, **{self.name: {self.block: scheme} if self.name in PER_BLOCK_COMPONENTS else scheme})


def searched_components(shape) -> list[Component]:
    """What the search assigns, for an ``architectures.ModelShape``: a tied LM head goes with the embedding."""
    blocks = range(shape.num_layers)
    found = [Component("embedding"), *(Component(c, b) for c in PER_BLOCK_COMPONENTS for b in blocks)]
    return found if shape.tied_lm_head else [*found, Component("lm_head")]


def fitting(component: Component, spec: SearchSpec, shape) -> list[str]:
    """The candidates ai-edge-quantizer applies to the component's op and whose blocks divide its weights."""
    op = Op.EMBEDDING_LOOKUP if component.name == "embedding" else Op.FULLY_CONNECTED
    dims = shape.reduction_dims.get(component.name, ())
    return [s for s in spec.candidates(op) if all(d % (block_size(s) or 1) == 0 for d in dims)]


@dataclass(frozen=True)
class Sensitivity:
    component: str  # its label
    scheme: str
    cost: float  # what the component alone adds: KL, or log perplexity ratio
    mean_kl: float
    perplexity_ratio: float
    weight_bytes: int  # of this component's weights in this scheme


@dataclass(frozen=True)
class Round:
    """One choice and its verification on the whole eval text."""

    target: float
    predicted: float  # the summed sensitivities of the choice
    verified: float  # the budget's metric, measured
    weight_bytes: int
    assignment: dict[str, str]


@dataclass
class SearchTrace:
    """Everything the search measured and chose: the evidence behind a resolved recipe."""

    gate: str
    budget: float
    schemes: list[str]
    sensitivity_tokens: int
    sensitivities: list[Sensitivity] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    float_weight_bytes: dict[str, int] = field(default_factory=dict)
    quantize_passes: int = 0
    scoring_passes: int = 0
    cached_sensitivities: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def metric_budget(self) -> float:
        return math.log(self.budget) if self.gate == "max_perplexity_ratio" else self.budget


@dataclass(frozen=True)
class Option:
    scheme: str
    cost: float
    weight_bytes: int


def choose(options: dict[str, list[Option]], target: float) -> dict[str, Option] | None:
    """The assignment (component -> option) with the fewest bytes whose summed cost, each rounded up to a step of
    target / STEPS, stays within ``target``; None when none does."""
    if target <= 0:
        return None
    unit = target / STEPS
    best = np.full(STEPS + 1, np.inf)
    best[0] = 0.0
    picks: list[tuple[str, np.ndarray, np.ndarray]] = []  # per component: chosen option and its steps, by state
    for component, opts in options.items():
        new = np.full(STEPS + 1, np.inf)
        pick = np.full(STEPS + 1, -1)
        step_of = np.zeros(STEPS + 1, dtype=int)
        for i, option in enumerate(opts):
            steps = math.ceil(max(option.cost, 0.0) / unit - 1e-9)
            if steps > STEPS:
                continue
            shifted = np.full(STEPS + 1, np.inf)
            shifted[steps:] = best[: STEPS + 1 - steps] + option.weight_bytes
            better = shifted < new
            new[better], pick[better], step_of[better] = shifted[better], i, steps
        best = new
        picks.append((component, pick, step_of))
    if not np.isfinite(best).any():
        return None
    state, chosen = int(np.argmin(best)), {}
    for component, pick, step_of in reversed(picks):
        chosen[component] = options[component][pick[state]]
        state -= step_of[state]
    return chosen


def assigned_recipe(recipe: Recipe, assignment: dict[str, str], components: list[Component]) -> Recipe:
    """The concrete recipe the assignment makes, with the search recipe's name and gates."""
    fields: dict[str, Any] = {"attention": {}, "feedforward": {}}
    for component in components:
        scheme = assignment[component.label]
        if component.name in PER_BLOCK_COMPONENTS:
            fields[component.name][component.block] = scheme
        else:
            fields[component.name] = scheme
    return replace(recipe, search=None, source=f"{recipe.source} (search)", **fields)


@dataclass
class SearchContext:
    """What a search works with: the model's files, its reference and where to put its scratch files."""

    float_tflite: Path
    shape: Any  # architectures.ModelShape
    reference: FloatReference
    settings: ExportSettings
    num_threads: int
    work_dir: Path  # scratch files and the sensitivity cache
    cache_key: str  # what sensitivities depend on besides checkpoint and scheme: eval text, calibration
    calibration: Callable[[Recipe], dict]  # ai-edge-quantizer's calibration result for a calibrated recipe
    log: Callable[[str], None] = print

    def quantize(self, recipe: Recipe, output: Path) -> Path:
        calibration = self.calibration(recipe) if recipe.needs_calibration else None
        quantizer_recipe = ai_edge_quantizer_recipe(recipe, self.shape.tied_lm_head)
        return quantize_model(
            self.float_tflite, quantizer_recipe, embedder_quantizer_recipe(recipe), output, calibration
        )

    def score(self, tflite: Path, windows: int | None) -> Fidelity:
        with InterpreterSession(tflite, self.settings, self.num_threads) as session:
            return score_windows(session, self.reference, windows).result()


def _component_bytes(weights: list[WeightTensor], component: Component) -> int:
    """Stored bytes of the component's weights (a tied LM head's table is the embedding's)."""
    mine = [w for w in weights if w.component == component.name and w.block == component.block]
    return sum({(w.file, w.buffer): w.num_bytes for w in mine}.values())


def _measured(
    context: SearchContext, scheme: str, components: list[Component], windows: int, trace: SearchTrace
) -> dict[str, dict[str, float]]:
    """By component label, what ``scheme`` on that component alone adds, from the cache or measured now. One
    process measures a scheme of a model at a time (a lock on its cache), so two searches running side by side
    share the work rather than repeat it."""
    cache = context.work_dir / "sensitivity" / f"{scheme}-{context.cache_key}-w{windows}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with (cache.parent / f".{cache.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = json.loads(cache.read_text()) if cache.exists() else {}
        todo = [c for c in components if c.label not in known]
        probe = context.work_dir / f"probe-{os.getpid()}.tflite"
        for n, component in enumerate(todo, 1):
            context.quantize(component.recipe("probe", scheme), probe)
            fidelity = context.score(probe, windows)
            known[component.label] = {
                "mean_kl": fidelity.mean_kl,
                "perplexity_ratio": fidelity.perplexity_ratio,
                "weight_bytes": _component_bytes(inspect_tflite(probe).weights, component),
            }
            probe.unlink()
            trace.quantize_passes += 1
            trace.scoring_passes += 1
            if n % 10 == 0 or n == len(todo):  # a search cut short keeps what it measured
                context.log(f"sensitivity of {scheme}: {n}/{len(todo)} components measured")
                write_atomically(cache, json.dumps(known).encode())
    trace.cached_sensitivities += len(components) - len(todo)
    return known


def _sensitivities(context: SearchContext, spec: SearchSpec, components: list[Component], trace: SearchTrace) -> None:
    """Every (component, candidate that fits it), measured or read from the cache."""
    windows = max(1, math.ceil(spec.sensitivity_tokens / context.settings.kv_cache_len))
    cost_of = _COSTS[spec.gate]
    fits = {c.label: fitting(c, spec, context.shape) for c in components}
    for scheme in spec.schemes:
        taking = [c for c in components if scheme in fits[c.label]]
        measured = _measured(context, scheme, taking, windows, trace)
        for component in taking:
            m = measured[component.label]
            cost = cost_of(m["mean_kl"], m["perplexity_ratio"])
            trace.sensitivities.append(
                Sensitivity(component.label, scheme, cost, m["mean_kl"], m["perplexity_ratio"], m["weight_bytes"])
            )


def _verified(
    context: SearchContext,
    recipe: Recipe,
    components: list[Component],
    choice: dict[str, Option],
    target: float,
    cost_of: Callable[[float, float], float],
) -> tuple[Recipe, Round]:
    """The choice as a recipe, quantized and scored on the whole eval text."""
    assignment = {label: option.scheme for label, option in choice.items()}
    concrete = assigned_recipe(recipe, assignment, components)
    candidate = context.work_dir / f"verify-{os.getpid()}.tflite"
    context.quantize(concrete, candidate)
    fidelity = context.score(candidate, None)
    candidate.unlink()
    return concrete, Round(
        target=target,
        predicted=sum(o.cost for o in choice.values()),
        verified=cost_of(fidelity.mean_kl, fidelity.perplexity_ratio),
        weight_bytes=sum(o.weight_bytes for o in choice.values()),
        assignment=assignment,
    )


def search(recipe: Recipe, context: SearchContext) -> tuple[Recipe, SearchTrace]:
    """Resolve ``recipe``'s budget for this model: the concrete recipe, and the trace of how it was chosen."""
    spec, started = recipe.search, time.perf_counter()
    trace = SearchTrace(spec.gate, spec.budget, list(spec.schemes), spec.sensitivity_tokens)
    components = searched_components(context.shape)
    unfit = [c.label for c in components if not fitting(c, spec, context.shape)]
    if unfit:
        raise RecipeError(
            f"recipe {recipe.name!r}, field 'search': no candidate scheme fits {', '.join(unfit[:3])} of this model "
            "(blocks that do not divide its weights, or an op ai-edge-quantizer refuses); add a per-channel scheme."
        )
    context.work_dir.mkdir(parents=True, exist_ok=True)
    float_weights = inspect_tflite(context.float_tflite).weights
    trace.float_weight_bytes = {c.label: _component_bytes(float_weights, c) for c in components}
    _sensitivities(context, spec, components, trace)
    options = {
        c.label: [Option(s.scheme, s.cost, s.weight_bytes) for s in trace.sensitivities if s.component == c.label]
        for c in components
    }
    budget, target, cost_of = trace.metric_budget, trace.metric_budget, _COSTS[spec.gate]
    cheapest = {label: min(opts, key=lambda o: o.cost) for label, opts in options.items()}
    tried: set[tuple[tuple[str, str], ...]] = set()
    for _ in range(MAX_ROUNDS):
        choice = choose(options, target) or cheapest
        key = tuple(sorted((label, option.scheme) for label, option in choice.items()))
        if key in tried:  # the same choice again: tighten further without measuring it twice
            target *= 0.5
            continue
        tried.add(key)
        concrete, verified = _verified(context, recipe, components, choice, target, cost_of)
        trace.quantize_passes += 1
        trace.scoring_passes += 1
        trace.rounds.append(verified)
        context.log(
            f"round {len(trace.rounds)}: target {target:.4g}, predicted {verified.predicted:.4g}, verified "
            f"{verified.verified:.4g} (budget {budget:.4g}), {verified.weight_bytes / 1e6:.2f} MB of weights"
        )
        if verified.verified <= budget:
            trace.seconds = time.perf_counter() - started
            return concrete, trace
        if choice is cheapest:
            break
        target *= budget / verified.verified
    trace.seconds = time.perf_counter() - started
    closest = min(trace.rounds, key=lambda r: r.verified)
    raise SearchError(
        f"recipe {recipe.name!r}: no assignment of {', '.join(spec.schemes)} met {spec.gate} {spec.budget:g} on this "
        f"model; the closest verified {_shown(spec.gate, closest.verified)} after {len(trace.rounds)} rounds. Allow "
        "more precise schemes or a looser budget."
    )


def _shown(gate: str, cost: float) -> str:
    return f"perplexity ratio {math.exp(cost):.4f}" if gate == "max_perplexity_ratio" else f"mean KL {cost:.4g}"


@dataclass(frozen=True)
class ResolvedRecipe:
    """A catalog recipe as it applies to one model: the recipe itself, or for a budget, the recipe the search
    chose, with the trace of how."""

    catalog: Recipe  # as the catalog has it: its name, gates and spec hash name the artifact's version
    recipe: Recipe  # concrete components and blocks: what quantizing applies and conformance checks
    trace: SearchTrace | None = None
