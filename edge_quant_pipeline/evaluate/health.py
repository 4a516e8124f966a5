"""Long-generation health: whether greedy generations collapse into loops, the failure short agreement checks and
smoke tests miss (a broken int4 model still writes a plausible first sentence, then repeats it).

Each generation is scored on its own tokens, then averaged over the prompts:

- repeated n-gram share: of its n-grams (4 tokens), the share that already occurred earlier in it;
- distinct-token ratio: distinct tokens over tokens;
- early stops: the share of generations that ended (a stop token) before the token budget.

A recipe is compared with the float model's generations from the same prompts in the same runtime
(``gates.check_health_gates``): what matters is collapse where the float model does not collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NGRAM = 4


@dataclass(frozen=True)
class GenerationHealth:
    repeated_ngram_share: float
    distinct_token_ratio: float
    early_stops: float
    mean_tokens: float


def _repeated_ngram_share(tokens: list[int]) -> float:
    grams = [tuple(tokens[i : i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)]
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


def generation_health(generations: list[list[int]], decoded: list[int], budget: int) -> GenerationHealth:
    """The health of ``generations`` (token ids), of which the runtime decoded ``decoded`` tokens each, out of
    ``budget``."""
    return GenerationHealth(
        repeated_ngram_share=float(np.mean([_repeated_ngram_share(g) for g in generations])),
        distinct_token_ratio=float(np.mean([len(set(g)) / len(g) if g else 0.0 for g in generations])),
        early_stops=float(np.mean([n < budget for n in decoded])),
        mean_tokens=float(np.mean(decoded)),
    )
