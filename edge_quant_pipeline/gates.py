"""Quality gates: thresholds a recipe's evaluation must meet before it is published."""

import operator
from dataclasses import dataclass
from typing import Any, Mapping

# gate name -> (Evaluation field, comparison that must hold)
GATES = {
    "max_perplexity_ratio": ("perplexity_ratio", operator.le),
    "max_mean_kl": ("mean_kl", operator.le),
    "min_top1_agreement": ("top1_agreement", operator.ge),
    "min_generation_agreement": ("generation_agreement", operator.ge),
    "min_logits_sqnr_db": ("logits_sqnr_db", operator.ge),
}

# Loose enough for int4 on the demo model (ppl ratio 1.03, top-1 0.87), tight enough
# to stop a broken model; override per recipe or for all recipes in recipes.yaml.
DEFAULT_GATES = {"max_perplexity_ratio": 1.10, "min_top1_agreement": 0.80}


class GateConfigError(ValueError):
    """A gate in recipes.yaml is unknown or not a number."""


def parse_gates(where: str, body: Any) -> dict[str, float]:
    if body is None:
        return {}
    if not isinstance(body, Mapping):
        raise GateConfigError(f"{where}: 'gates' must map gate names to numbers; allowed gates: {', '.join(GATES)}.")
    unknown = sorted(set(body) - set(GATES))
    if unknown:
        raise GateConfigError(
            f"{where}: unknown gate(s) {', '.join(map(str, unknown))}; allowed gates: {', '.join(GATES)}."
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

    @property
    def passed(self) -> bool:
        _, holds = GATES[self.gate]
        return holds(self.value, self.threshold)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "fails"
        return f"{GATES[self.gate][0]} = {self.value:.4g} ({verdict} {self.gate} {self.threshold:g})"


def check_gates(metrics: Mapping[str, float], gates: Mapping[str, float]) -> list[GateResult]:
    return [GateResult(gate, threshold, float(metrics[GATES[gate][0]])) for gate, threshold in gates.items()]
