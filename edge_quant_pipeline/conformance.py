"""Does a quantized ``.tflite`` hold what its recipe asked for, component by component?

The recipe says which scheme each component gets; the flatbuffer says which
dtype, granularity and compute path its weights really have (``weights.py``).
Both are reduced to rows keyed by (component, block) and compared. This is how
we caught litert-torch 0.10 applying the default scheme where a selective
recipe asked for another (see ``recipes.ai_edge_quantizer_recipe``).
"""

from dataclasses import dataclass

from edge_quant_pipeline.architectures import ModelShape
from edge_quant_pipeline.recipes import SCHEMES, Recipe, scheme_for
from edge_quant_pipeline.weights import WeightTensor

FLOAT = ("FLOAT32", "none", "float")


def stored_as(scheme: str | None) -> tuple[str, str, str]:
    """(dtype, granularity, compute) that a scheme produces in the flatbuffer."""
    if scheme is None:
        return FLOAT
    s = SCHEMES[scheme]
    dtype = {"INT8": "INT8", "INT4": "INT4", "FP16": "FLOAT16"}[s.weight_dtype]
    granularity = {"CHANNELWISE": "channelwise", "NONE": "none"}.get(s.granularity, s.granularity.lower())
    compute = "integer" if s.mode == "DYNAMIC_RANGE" else "float"
    return dtype, granularity, compute


@dataclass(frozen=True)
class ConformanceRow:
    component: str
    block: int | None
    expected: tuple[str, str, str]
    actual: tuple[str, str, str]

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


MISSING = ("missing", "", "")


def model_components(shape: ModelShape) -> list[tuple[str, int | None]]:
    blocks = range(shape.num_layers)
    return (
        [("embedding", None)]
        + [("attention", b) for b in blocks]
        + [("feedforward", b) for b in blocks]
        + [("lm_head", None)]
    )


def check_conformance(recipe: Recipe, weights: list[WeightTensor], shape: ModelShape) -> list[ConformanceRow]:
    """One row per component and block of the model; a missing or mixed component never passes."""
    actual: dict[tuple[str, int | None], set[tuple[str, str, str]]] = {}
    for w in weights:
        actual.setdefault((w.component, w.block), set()).add((w.dtype, w.granularity, w.compute))
    rows = []
    for component, block in model_components(shape):
        kinds = actual.get((component, block), set())
        found = next(iter(kinds)) if len(kinds) == 1 else MISSING if not kinds else ("mixed", str(sorted(kinds)), "")
        expected = stored_as(scheme_for(recipe, component, block, shape.tied_lm_head)[1])
        rows.append(ConformanceRow(component, block, expected, found))
    return rows
