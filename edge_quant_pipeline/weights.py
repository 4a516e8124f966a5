"""What a ``.tflite`` really holds: its weight tensors, their dtype, granularity and bytes.

Weights are the constant operands of FULLY_CONNECTED (input 1) and
EMBEDDING_LOOKUP (input 1). Weight-only schemes store them behind a
DEQUANTIZE op, which we look through. Each weight is attributed to a model
component from the name of the op that consumes it, as litert-torch writes it
(``...TransformerBlock_3/...CausalSelfAttention...``, ``decode_logits_output``).
A buffer shared by several consumers (the prefill and decode signatures, or a
tied embedding and LM head) is listed once per component and counted once in bytes.
A model's embedders (``embedders.py``) are part of it: their weights are its embedding.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass, replace
from pathlib import Path

from edge_quant_pipeline import op_names
from edge_quant_pipeline.embedders import embedders_of

_ATTENTION = re.compile(op_names.block_scope(op_names.ATTENTION, r"(\d+)"))
_FEEDFORWARD = re.compile(op_names.block_scope(op_names.FEEDFORWARD, r"(\d+)"))
_EMBEDDING = re.compile(op_names.EMBEDDING)
_LM_HEAD = re.compile(op_names.LM_HEAD)
_WEIGHT_OPS = ("FULLY_CONNECTED", "EMBEDDING_LOOKUP")


@dataclass(frozen=True)
class WeightTensor:
    component: str  # embedding | attention | feedforward | lm_head | other
    block: int | None
    dtype: str  # FLOAT32, FLOAT16, INT8, INT4
    granularity: str  # none | tensorwise | channelwise | blockwise_<n>
    compute: str  # float (dequantized before use) | integer (consumed quantized)
    shape: tuple[int, ...]
    num_bytes: int
    buffer: int  # flatbuffer buffer index; with ``file``, the identity of the stored data
    file: str = "model"  # the model, or the role of the embedder file that holds it


def component_of(op_output_name: str) -> tuple[str, int | None]:
    for component, pattern in (("attention", _ATTENTION), ("feedforward", _FEEDFORWARD)):
        match = pattern.search(op_output_name)
        if match:
            return component, int(match[1])
    if _EMBEDDING.search(op_output_name):
        return "embedding", None
    if _LM_HEAD.search(op_output_name):
        return "lm_head", None
    return "other", None


def _granularity(quant, schema) -> str:
    if quant is None:
        return "none"
    if quant.DetailsType() == schema.QuantizationDetails.BlockwiseQuantization:
        return f"blockwise_{_blockwise(quant, schema).BlockSize()}"
    scales = quant.ScaleLength()
    return "none" if scales == 0 else "tensorwise" if scales == 1 else "channelwise"


def _blockwise(quant, schema):
    details = schema.BlockwiseQuantization()
    table = quant.Details()
    details.Init(table.Bytes, table.Pos)
    return details


def _buffer_bytes(model, index: int) -> int:
    """Stored bytes of a buffer: inline data, or (models over 2 GB) a slice after the flatbuffer."""
    buffer = model.Buffers(index)
    return buffer.DataLength() or buffer.Size()


def _quant_param_bytes(quant, subgraph, model, schema) -> int:
    """Scales stored beside a quantized weight count towards its size."""
    if quant is None:
        return 0
    if quant.DetailsType() == schema.QuantizationDetails.BlockwiseQuantization:
        return _buffer_bytes(model, subgraph.Tensors(_blockwise(quant, schema).Scales()).Buffer())
    return 4 * quant.ScaleLength()


def read_weights(tflite: Path) -> list[WeightTensor]:
    """The weights of the model in ``tflite`` and of its embedders."""
    weights = _read_file_weights(tflite)
    for role, path in embedders_of(tflite).items():
        weights += [replace(w, component="embedding", file=role) for w in _read_file_weights(path)]
    return weights


def _read_file_weights(tflite: Path) -> list[WeightTensor]:
    """Walks the flatbuffer in place (memory-mapped) rather than unpacking it into Python objects:
    the object API copies every buffer, which costs seconds and the model's size in memory."""
    from ai_edge_litert import schema_py_generated as schema

    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    with tflite.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = schema.Model.GetRootAs(data, 0)
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        weight_ops = {
            i for i, c in enumerate(codes) if op_names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())] in _WEIGHT_OPS
        }
        weights: dict[tuple[int, str, int | None], WeightTensor] = {}
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            operators = [subgraph.Operators(i) for i in range(subgraph.OperatorsLength())]
            producers = {out: op for op in operators for out in op.OutputsAsNumpy().tolist()}
            for op in operators:
                if op.OpcodeIndex() not in weight_ops:
                    continue
                index, compute = int(op.Inputs(1)), "integer"
                producer = producers.get(index)
                if producer is not None:  # weight-only schemes: weight -> DEQUANTIZE -> op
                    index, compute = int(producer.Inputs(0)), "float"
                tensor = subgraph.Tensors(index)
                component, block = component_of(subgraph.Tensors(op.Outputs(0)).Name().decode())
                key = (tensor.Buffer(), component, block)
                stored = _buffer_bytes(model, tensor.Buffer())
                if stored == 0 or key in weights:
                    continue
                dtype, quant = type_names[tensor.Type()], tensor.Quantization()
                weights[key] = WeightTensor(
                    component=component,
                    block=block,
                    dtype=dtype,
                    granularity=_granularity(quant, schema),
                    compute="float" if dtype.startswith("FLOAT") else compute,
                    shape=tuple(int(d) for d in tensor.ShapeAsNumpy()),
                    num_bytes=stored + _quant_param_bytes(quant, subgraph, model, schema),
                    buffer=tensor.Buffer(),
                )
    return list(weights.values())


@dataclass(frozen=True)
class TfliteModel:
    """A ``.tflite`` file on disk, its embedders beside it, and the weights inside them."""

    path: Path
    file_bytes: int  # the model's and its embedders'
    weights: list[WeightTensor]

    @property
    def embedders(self) -> dict[str, Path]:
        return embedders_of(self.path)

    @property
    def weight_bytes(self) -> int:
        return sum({(w.file, w.buffer): w.num_bytes for w in self.weights}.values())

    def embedder_metadata(self) -> dict[str, str]:
        """For the UI, where there are embedders."""
        return {"embedders": ", ".join(str(p) for p in self.embedders.values())} if self.embedders else {}


def inspect_tflite(path: Path) -> TfliteModel:
    files = (path, *embedders_of(path).values())
    return TfliteModel(path=path, file_bytes=sum(p.stat().st_size for p in files), weights=read_weights(path))
