"""What a ``.tflite`` really holds: its weight tensors, their dtype, granularity and bytes.

Weights are the constant operands of FULLY_CONNECTED (input 1) and
EMBEDDING_LOOKUP (input 1). Weight-only schemes store them behind a
DEQUANTIZE op, which we look through. Each weight is attributed to a model
component from the name of the op that consumes it, as litert-torch writes it
(``...TransformerBlock_3/...CausalSelfAttention...``, ``decode_logits_output``).
A buffer shared by several consumers (the prefill and decode signatures, or a
tied embedding and LM head) is listed once per component and counted once in bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edge_quant_pipeline import op_names

_ATTENTION = re.compile(op_names.block_scope(op_names.ATTENTION, r"(\d+)"))
_FEEDFORWARD = re.compile(op_names.block_scope(op_names.FEEDFORWARD, r"(\d+)"))
_LM_HEAD = re.compile(op_names.LM_HEAD)


@dataclass(frozen=True)
class WeightTensor:
    component: str  # embedding | attention | feedforward | lm_head | other
    block: int | None
    dtype: str  # FLOAT32, FLOAT16, INT8, INT4
    granularity: str  # none | tensorwise | channelwise | blockwise_<n>
    compute: str  # float (dequantized before use) | integer (consumed quantized)
    shape: tuple[int, ...]
    num_bytes: int
    buffer: int  # flatbuffer buffer index; the identity of the stored data


def component_of(op_output_name: str) -> tuple[str, int | None]:
    for component, pattern in (("attention", _ATTENTION), ("feedforward", _FEEDFORWARD)):
        match = pattern.search(op_output_name)
        if match:
            return component, int(match[1])
    if op_names.EMBEDDING in op_output_name:
        return "embedding", None
    if _LM_HEAD.search(op_output_name):
        return "lm_head", None
    return "other", None


def _granularity(tensor, schema) -> str:
    quant = tensor.quantization
    if quant is None:
        return "none"
    if quant.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
        return f"blockwise_{quant.details.blockSize}"
    if quant.scale is None or len(quant.scale) == 0:
        return "none"
    return "tensorwise" if len(quant.scale) == 1 else "channelwise"


def _quant_param_bytes(tensor, subgraph, buffers, schema) -> int:
    """Scales stored beside a quantized weight count towards its size."""
    quant = tensor.quantization
    if quant is None:
        return 0
    if quant.detailsType == schema.QuantizationDetails.BlockwiseQuantization:
        scales = buffers[subgraph.tensors[quant.details.scales].buffer].data
        return 0 if scales is None else len(scales)
    return 4 * len(quant.scale) if quant.scale is not None else 0


def read_weights(tflite: Path) -> list[WeightTensor]:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(tflite.read_bytes())
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    weights: dict[tuple[int, str, int | None], WeightTensor] = {}
    for subgraph in model.subgraphs:
        producers = {out: op for op in subgraph.operators for out in op.outputs}
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if op_names[max(code.builtinCode, code.deprecatedBuiltinCode)] not in (
                "FULLY_CONNECTED",
                "EMBEDDING_LOOKUP",
            ):
                continue
            index, compute = op.inputs[1], "integer"
            producer = producers.get(index)
            if producer is not None:  # weight-only schemes: weight -> DEQUANTIZE -> op
                index, compute = producer.inputs[0], "float"
            tensor = subgraph.tensors[index]
            data = model.buffers[tensor.buffer].data
            component, block = component_of(subgraph.tensors[op.outputs[0]].name.decode())
            if data is None or (tensor.buffer, component, block) in weights:
                continue
            dtype = type_names[tensor.type]
            weights[(tensor.buffer, component, block)] = WeightTensor(
                component=component,
                block=block,
                dtype=dtype,
                granularity=_granularity(tensor, schema),
                compute="float" if dtype.startswith("FLOAT") else compute,
                shape=tuple(int(d) for d in tensor.shape),
                num_bytes=len(data) + _quant_param_bytes(tensor, subgraph, model.buffers, schema),
                buffer=tensor.buffer,
            )
    return list(weights.values())


@dataclass(frozen=True)
class TfliteModel:
    """A ``.tflite`` file on disk and the weights inside it."""

    path: Path
    file_bytes: int
    weights: list[WeightTensor]

    @property
    def weight_bytes(self) -> int:
        return sum({w.buffer: w.num_bytes for w in self.weights}.values())


def inspect_tflite(path: Path) -> TfliteModel:
    return TfliteModel(path=path, file_bytes=path.stat().st_size, weights=read_weights(path))
