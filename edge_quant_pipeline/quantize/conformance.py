"""Does a quantized ``.tflite`` hold what its recipe asked for, component by component?

The recipe says which scheme each component gets; the flatbuffer says which
dtype, granularity and compute path its weights really have, and whether their
layers run on Hadamard-rotated inputs (``weights.py``). Both are reduced to rows
keyed by (component, block) and compared. This is how we caught litert-torch 0.10
applying the default scheme where a selective recipe asked for another (see
``translate.ai_edge_quantizer_recipe``). Of the algorithms, only the Hadamard rotation
shows in the file's structure; GPTQ, OCTAV and MSE only change the values.
"""

from dataclasses import dataclass
from typing import NamedTuple

from edge_quant_pipeline.quantize.recipes import Recipe
from edge_quant_pipeline.quantize.schemes import parse_quantization
from edge_quant_pipeline.quantize.translate import scheme_for
from edge_quant_pipeline.shapes import ModelShape
from edge_quant_pipeline.weights import WeightTensor


class Storage(NamedTuple):
    """How a component's weights are stored and computed."""

    dtype: str  # FLOAT32, FLOAT16, INT8, INT4, INT2
    granularity: str  # none, channelwise, blockwise_<n>
    compute: str  # float, integer, static a8, static a16
    rotation: str = ""  # "hadamard" where its layers take rotated inputs

    def __str__(self) -> str:
        return " ".join(part for part in self if part)


FLOAT = Storage("FLOAT32", "none", "float")
MISSING = Storage("missing", "", "")


def stored_as(scheme: str | None) -> Storage:
    """What a scheme (``scheme[+algorithm]``) produces in the flatbuffer."""
    if not scheme:
        return FLOAT
    quantization = parse_quantization(scheme)
    return Storage(*quantization.scheme.stored_as, "hadamard" if quantization.algorithm == "hadamard" else "")


def _storage(weight: WeightTensor) -> Storage:
    return Storage(weight.dtype, weight.granularity, weight.compute, "hadamard" if weight.rotated else "")


@dataclass(frozen=True)
class ConformanceRow:
    component: str
    block: int | None
    expected: Storage
    actual: Storage

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


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
    actual: dict[tuple[str, int | None], set[Storage]] = {}
    for w in weights:
        actual.setdefault((w.component, w.block), set()).add(_storage(w))
    rows = []
    for component, block in model_components(shape):
        kinds = actual.get((component, block), set())
        found = (
            next(iter(kinds)) if len(kinds) == 1 else MISSING if not kinds else Storage("mixed", str(sorted(kinds)), "")
        )
        expected = stored_as(scheme_for(recipe, component, block, shape.tied_lm_head)[1])
        rows.append(ConformanceRow(component, block, expected, found))
    return rows
