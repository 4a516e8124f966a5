"""Quality gates: thresholds a recipe's evaluation must meet before it is published."""

import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

# gate name -> (Evaluation field, comparison that must hold)
GATES = {
    "max_perplexity_ratio": ("perplexity_ratio", operator.le),
    "max_mean_kl": ("mean_kl", operator.le),
    "min_top1_agreement": ("top1_agreement", operator.ge),
    "min_generation_agreement": ("generation_agreement", operator.ge),
    "min_logits_sqnr_db": ("logits_sqnr_db", operator.ge),
}
# Not a threshold: with it, a gate on a metric that has a standard error fails only when the metric is past its
# threshold by more than this many standard errors, so a recipe is not refused for a difference the eval text
# cannot tell from noise. Without it (0), every gate compares the value alone.
SIGNIFICANCE = "significance_sigmas"
# Task accuracy in LiteRT-LM against the float model's (the float bundle's, same tasks, same runtime): a recipe
# fails when a task's score drops more than TASK_DROP points below float and more than TASK_SIGMAS standard
# errors of the difference. ``max_task_drop_points`` holds for every task, ``max_task_drop_points.<task>`` for one.
TASK_DROP, TASK_SIGMAS = "max_task_drop_points", "task_drop_sigmas"
# Long-generation health in LiteRT-LM against the float model's (evaluate/health.py): gate name -> (the
# GenerationHealth field, whether a higher value is worse). Each bounds how much worse than float it may be.
HEALTH_GATES = {
    "max_repetition_increase": ("repeated_ngram_share", True),
    "max_distinct_drop": ("distinct_token_ratio", False),
    "max_early_stop_increase": ("early_stops", True),
}
ALLOWED = (*GATES, SIGNIFICANCE, TASK_DROP, TASK_SIGMAS, *HEALTH_GATES)  # and TASK_DROP.<task>

# Loose enough for int4 on the demo model (ppl ratio 1.03, top-1 0.87; cloze -5.8 points, within 2 standard
# errors), tight enough to stop a broken model; override per recipe or for all recipes in recipes.yaml.
# The health gates stop a recipe whose long generations loop, repeat tokens or stop where float's do not; the demo
# model's own greedy generations loop (repeated 4-gram share 0.77), so on it they stop nothing.
DEFAULT_GATES = {
    "max_perplexity_ratio": 1.10,
    "min_top1_agreement": 0.80,
    TASK_DROP: 5.0,
    TASK_SIGMAS: 2.0,
    "max_repetition_increase": 0.3,
    "max_distinct_drop": 0.3,
    "max_early_stop_increase": 0.5,
}


_ALLOWED_TEXT = ", ".join([*ALLOWED, f"{TASK_DROP}.<task>"])


def _is_task_gate(name: str) -> bool:
    """``max_task_drop_points.<task>``, a task named as lm-eval names them (letters, digits, ``_``, ``-``, ``.``)."""
    return re.fullmatch(rf"{re.escape(TASK_DROP)}\.[\w.-]+", name) is not None


class GateConfigError(ValueError):
    """A gate in recipes.yaml is unknown or not a number."""


def parse_gates(where: str, body: Any) -> dict[str, float]:
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise GateConfigError(f"{where}: 'gates' must map gate names to numbers; allowed gates: {_ALLOWED_TEXT}.")
    unknown = sorted(name for name in body if name not in ALLOWED and not _is_task_gate(str(name)))
    if unknown:
        raise GateConfigError(
            f"{where}: unknown gate(s) {', '.join(map(str, unknown))}; allowed gates: {_ALLOWED_TEXT}."
        )
    for name, value in body.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GateConfigError(f"{where}: gate {name!r} must be a number, not {value!r}.")
    return {name: float(value) for name, value in body.items()}


@dataclass(frozen=True)
class GateResult:
    gate: str
    threshold: float
    value: float
    error: float = 0.0  # the value's standard error, where the metric has one
    sigmas: float = 0.0  # how many of them the value may be past the threshold (SIGNIFICANCE)

    @property
    def passed(self) -> bool:
        _, holds = GATES[self.gate]
        benefit = self.sigmas * self.error  # the value moved towards the threshold by its allowed noise
        return holds(self.value - benefit if holds is operator.le else self.value + benefit, self.threshold)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "fails"
        value = f"{self.value:.4g} ± {self.error:.2g}" if self.error else f"{self.value:.4g}"
        noise = f", by more than {self.sigmas:g} standard errors" if self.sigmas and self.error else ""
        return f"{GATES[self.gate][0]} = {value} ({verdict} {self.gate} {self.threshold:g}{noise})"


def check_gates(metrics: Mapping[str, float], gates: Mapping[str, float]) -> list[GateResult]:
    sigmas = gates.get(SIGNIFICANCE, 0.0)
    return [
        GateResult(gate, threshold, float(metrics[field]), float(metrics.get(f"{field}_error", 0.0)), sigmas)
        for gate, threshold in gates.items()
        if gate in GATES
        for field in [GATES[gate][0]]
    ]


class Score(Protocol):
    """A task's score and its standard error (``evaluate.tasks.TaskScore``)."""

    task: str
    value: float
    stderr: float


@dataclass(frozen=True)
class TaskGateResult:
    """One task's drop from the float model, in points, against the most it may drop."""

    task: str
    threshold: float  # points
    drop: float  # float's score minus the recipe's, in points
    error: float  # the drop's standard error, in points: the two scores' errors combined as independent
    sigmas: float

    @property
    def gate(self) -> str:
        return f"{TASK_DROP}.{self.task}"

    @property
    def value(self) -> float:
        return self.drop

    @property
    def passed(self) -> bool:
        return not (self.drop > self.threshold and self.drop > self.sigmas * self.error)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "fails"
        return (
            f"{self.task} is {self.drop:.1f} ± {self.error:.1f} points below float ({verdict} {TASK_DROP} "
            f"{self.threshold:g} and {self.sigmas:g} standard errors)"
        )


def check_task_gates(
    scores: list[Score], float_scores: list[Score], gates: Mapping[str, float]
) -> list[TaskGateResult]:
    """Each task scored by both the recipe and the float model, against its drop gate (none: not gated)."""
    floats = {score.task: score for score in float_scores}
    results = []
    for score in scores:
        threshold = gates.get(f"{TASK_DROP}.{score.task}", gates.get(TASK_DROP))
        if threshold is None or score.task not in floats:
            continue
        reference = floats[score.task]
        drop, error = 100 * (reference.value - score.value), 100 * math.hypot(reference.stderr, score.stderr)
        results.append(TaskGateResult(score.task, threshold, drop, error, gates.get(TASK_SIGMAS, 0.0)))
    return results


@dataclass(frozen=True)
class HealthGateResult:
    """How much worse than the float model's the recipe's long generations are on one measure, against the most
    they may be."""

    gate: str
    threshold: float
    value: float  # the recipe's measure
    reference: float  # the float model's

    @property
    def worse_by(self) -> float:
        _, higher_is_worse = HEALTH_GATES[self.gate]
        return self.value - self.reference if higher_is_worse else self.reference - self.value

    @property
    def passed(self) -> bool:
        return self.worse_by <= self.threshold

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "fails"
        field, _ = HEALTH_GATES[self.gate]
        threshold = f"{verdict} {self.gate} {self.threshold:g}"
        return f"{field} = {self.value:.3f} against float's {self.reference:.3f} ({threshold})"


def check_health_gates(health: Any, float_health: Any, gates: Mapping[str, float]) -> list[HealthGateResult]:
    """The recipe's long generations in LiteRT-LM against the float model's (``evaluate.health.GenerationHealth``
    each; no result when either was not run)."""
    if health is None or float_health is None:
        return []
    return [
        HealthGateResult(gate, threshold, getattr(health, field), getattr(float_health, field))
        for gate, threshold in gates.items()
        if gate in HEALTH_GATES
        for field in [HEALTH_GATES[gate][0]]
    ]
