"""What a ``.tflite`` really holds: its weight tensors, their dtype, granularity and bytes.

Weights are the constant operands of FULLY_CONNECTED (input 1) and
EMBEDDING_LOOKUP (input 1). Weight-only schemes store them behind a
DEQUANTIZE op, which we look through. Each weight is attributed to a model
component from the name of the op that consumes it, as litert-torch writes it
(``...TransformerBlock_3/...CausalSelfAttention...``, ``decode_logits_output``).
A buffer shared by several consumers (the prefill and decode signatures, or a
tied embedding and LM head) is listed once per component and counted once in bytes.
A weight's bytes are what the file stores for it: its buffer, and the quantization
parameters of every tensor on that buffer (see ``_quant_bytes_by_buffer``).
A model's embedders (``embedders.py``) are part of it: their weights are its embedding.
"""

from __future__ import annotations

import filecmp
import mmap
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edge_quant_pipeline import op_names
from edge_quant_pipeline.embedders import embedders_of
from edge_quant_pipeline.workstore import SharedFiles

if TYPE_CHECKING:  # a value the export stage makes; this floor only carries it
    from edge_quant_pipeline.evaluate.export_proof import ExportProof

_ATTENTION = re.compile(op_names.block_scope(op_names.ATTENTION, r"(\d+)"))
_FEEDFORWARD = re.compile(op_names.block_scope(op_names.FEEDFORWARD, r"(\d+)"))
_EMBEDDING = re.compile(op_names.EMBEDDING)
_LM_HEAD = re.compile(op_names.LM_HEAD)
_WEIGHT_OPS = ("FULLY_CONNECTED", "EMBEDDING_LOOKUP")
# ai-edge-quantizer's decomposed Hadamard rotation: reshape, a FULLY_CONNECTED with this constant, reshape back.
HADAMARD_MATRIX_SUFFIX = "_hadamard_matrix"
_STATIC_ACTIVATIONS = {"INT8": "static a8", "INT16": "static a16"}


@dataclass(frozen=True)
class WeightTensor:
    component: str  # embedding | attention | feedforward | lm_head | other | rotation (a Hadamard matrix)
    block: int | None
    dtype: str  # FLOAT32, FLOAT16, INT8, INT4, INT2
    granularity: str  # none | tensorwise | channelwise | blockwise_<n>
    # float (dequantized before use) | integer (consumed quantized, activations quantized at run time) |
    # static a8 / static a16 (its layer's input activations stored as int8 / int16)
    compute: str
    shape: tuple[int, ...]
    num_bytes: int
    buffer: int  # flatbuffer buffer index; with ``file``, the identity of the stored data
    file: str = "model"  # the model, or the role of the embedder file that holds it
    rotated: bool = False  # its layer runs on Hadamard-rotated inputs (ai-edge-quantizer's `hadamard` algorithm)


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
    """Stored bytes of a buffer: inline data, or a slice after the flatbuffer (as ai-edge-quantizer writes every
    buffer, and the converter those of models over 2 GB)."""
    buffer = model.Buffers(index)
    return buffer.DataLength() or buffer.Size()


def _inline_quant_bytes(quant) -> int:
    """The scale, zero-point, min and max vectors of one tensor's quantization table, in the dtypes the schema
    stores them in (float32 scales, int64 zero points)."""
    vectors = (
        (quant.ScaleLength, quant.ScaleAsNumpy),
        (quant.ZeroPointLength, quant.ZeroPointAsNumpy),
        (quant.MinLength, quant.MinAsNumpy),
        (quant.MaxLength, quant.MaxAsNumpy),
    )
    return sum(as_numpy().nbytes for length, as_numpy in vectors if length())


def _side_buffers(quant, subgraph, schema) -> set[int]:
    """Buffers holding blockwise scales and zero points (a zero-point index of -1 means none)."""
    if quant.DetailsType() != schema.QuantizationDetails.BlockwiseQuantization:
        return set()
    details = _blockwise(quant, schema)
    return {subgraph.Tensors(i).Buffer() for i in (details.Scales(), details.ZeroPoints()) if i >= 0}


@dataclass(frozen=True)
class _Operand:
    """A weight as one op of one signature consumes it."""

    subgraph: int
    tensor: int
    consumer: str  # the consuming op's output name, which says the component
    compute: str
    rotated: bool = False


class _Graph:
    """One subgraph's ops, with who produces and who consumes each tensor."""

    def __init__(self, subgraph, fully_connected: set[int]):
        self.subgraph, self.fully_connected = subgraph, fully_connected
        self.operators = [subgraph.Operators(i) for i in range(subgraph.OperatorsLength())]
        self.producers = {out: op for op in self.operators for out in op.OutputsAsNumpy().tolist()}
        self.consumers: dict[int, list] = {}
        for op in self.operators:
            for tensor in op.InputsAsNumpy().tolist():
                self.consumers.setdefault(tensor, []).append(op)

    def name(self, tensor: int) -> str:
        return self.subgraph.Tensors(tensor).Name().decode()

    def is_rotation(self, op) -> bool:
        return op.OpcodeIndex() in self.fully_connected and self.name(op.Inputs(1)).endswith(HADAMARD_MATRIX_SUFFIX)

    def rotated_input(self, op) -> bool:
        """The op's input comes out of a Hadamard rotation (reshape <- rotation)."""
        reshape = self.producers.get(int(op.Inputs(0)))
        source = self.producers.get(int(reshape.Inputs(0))) if reshape is not None else None
        return source is not None and self.is_rotation(source)

    def rotated_output(self, op) -> bool:
        """The op's output goes into a Hadamard rotation (-> reshape -> rotation): an embedding lookup's."""
        return any(
            self.is_rotation(after)
            for reshape in self.consumers.get(int(op.Outputs(0)), [])
            for after in self.consumers.get(int(reshape.Outputs(0)), [])
        )


def _weight_operands(model, weight_ops: set[int], fully_connected: set[int], type_names: dict) -> list[_Operand]:
    operands = []
    for s in range(model.SubgraphsLength()):
        graph = _Graph(model.Subgraphs(s), fully_connected)
        for op in graph.operators:
            if op.OpcodeIndex() not in weight_ops:
                continue
            consumer = graph.name(op.Outputs(0))
            if graph.is_rotation(op):
                operands.append(_Operand(s, int(op.Inputs(1)), consumer, "float"))
                continue
            index, compute = int(op.Inputs(1)), "integer"
            producer = graph.producers.get(index)
            if producer is not None:  # weight-only schemes: weight -> DEQUANTIZE -> op
                index, compute = int(producer.Inputs(0)), "float"
            elif op.OpcodeIndex() in fully_connected:  # static schemes feed it quantized activations
                activation = type_names[graph.subgraph.Tensors(op.Inputs(0)).Type()]
                compute = _STATIC_ACTIVATIONS.get(activation, compute)
            rotated = graph.rotated_input(op) if op.OpcodeIndex() in fully_connected else graph.rotated_output(op)
            operands.append(_Operand(s, index, consumer, compute, rotated))
    return operands


def _quant_bytes_by_buffer(model, operands: list[_Operand], schema) -> dict[int, int]:
    """Quantization parameters stored for each weight buffer. Each tensor on a buffer (one per signature) has a
    table of its own, so its inline vectors are stored once per tensor; blockwise scales and zero points are
    buffers, stored once however many tensors name them."""
    inline: dict[int, int] = {}
    side: dict[int, set[int]] = {}
    for s, index in {(o.subgraph, o.tensor) for o in operands}:  # a tensor two ops consume is stored once
        subgraph = model.Subgraphs(s)
        tensor = subgraph.Tensors(index)
        buffer, quant = tensor.Buffer(), tensor.Quantization()
        inline[buffer] = inline.get(buffer, 0)
        side.setdefault(buffer, set())
        if quant is not None:
            inline[buffer] += _inline_quant_bytes(quant)
            side[buffer] |= _side_buffers(quant, subgraph, schema)
    return {b: inline[b] + sum(_buffer_bytes(model, i) for i in side[b]) for b in inline}


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
        code_names = [op_names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())] for c in codes]
        weight_ops = {i for i, name in enumerate(code_names) if name in _WEIGHT_OPS}
        fully_connected = {i for i, name in enumerate(code_names) if name == "FULLY_CONNECTED"}
        operands = [
            o
            for o in _weight_operands(model, weight_ops, fully_connected, type_names)
            if _buffer_bytes(model, model.Subgraphs(o.subgraph).Tensors(o.tensor).Buffer())
        ]
        quant_bytes = _quant_bytes_by_buffer(model, operands, schema)
        weights: dict[tuple[int, str, int | None], WeightTensor] = {}
        for operand in operands:
            tensor = model.Subgraphs(operand.subgraph).Tensors(operand.tensor)
            rotation = tensor.Name().decode().endswith(HADAMARD_MATRIX_SUFFIX)
            component, block = ("rotation", None) if rotation else component_of(operand.consumer)
            key = (tensor.Buffer(), component, block)
            if key in weights:
                continue
            dtype, quant = type_names[tensor.Type()], tensor.Quantization()
            weights[key] = WeightTensor(
                component=component,
                block=block,
                dtype=dtype,
                granularity=_granularity(quant, schema),
                compute="float" if dtype.startswith("FLOAT") else operand.compute,
                shape=tuple(int(d) for d in tensor.ShapeAsNumpy()),
                num_bytes=_buffer_bytes(model, tensor.Buffer()) + quant_bytes[tensor.Buffer()],
                buffer=tensor.Buffer(),
                rotated=operand.rotated,
            )
    return list(weights.values())


@dataclass(frozen=True)
class TfliteModel:
    """A ``.tflite`` file on disk, its embedders beside it, and the weights inside them."""

    path: Path
    file_bytes: int  # the model's and its embedders'
    weights: list[WeightTensor]
    shared: SharedFiles | None = None  # where the next step finds it, when steps share no disk (workstore.py)
    export_proof: ExportProof | None = None  # a float export of a family no test here covers (export_proof.py)
    # Of ``file_bytes``, the embedders': lookups the runtime maps and reads row by row, which the memory estimates
    # of running the model leave out (0: none, or recorded before this was)
    embedder_bytes: int = 0

    @property
    def model_bytes(self) -> int:
        """The model file alone."""
        return self.file_bytes - self.embedder_bytes

    @property
    def embedders(self) -> dict[str, Path]:
        return embedders_of(self.path)

    @property
    def weight_bytes(self) -> int:
        return sum({(w.file, w.buffer): w.num_bytes for w in self.weights}.values())

    def same_bytes_as(self, other: "TfliteModel") -> bool:
        """This file and its embedders are ``other``'s byte for byte (the `float` recipe's are the float export's):
        read only where the sizes match and the files are not one (a hard link)."""
        mine, theirs = {"": self.path, **self.embedders}, {"": other.path, **other.embedders}
        if self.file_bytes != other.file_bytes or mine.keys() != theirs.keys():
            return False
        return all(mine[k].samefile(theirs[k]) or filecmp.cmp(mine[k], theirs[k], shallow=False) for k in mine)

    def embedder_metadata(self) -> dict[str, str]:
        """For the UI, where there are embedders."""
        return {"embedders": ", ".join(str(p) for p in self.embedders.values())} if self.embedders else {}


def inspect_tflite(path: Path) -> TfliteModel:
    embedder_bytes = sum(p.stat().st_size for p in embedders_of(path).values())
    return TfliteModel(
        path=path,
        file_bytes=path.stat().st_size + embedder_bytes,
        weights=read_weights(path),
        embedder_bytes=embedder_bytes,
    )
