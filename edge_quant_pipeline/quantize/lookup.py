"""A lookup's table quantized a slice of rows at a time, by ai-edge-quantizer itself, and put back together.

ai-edge-quantizer reads a whole model and works on whole tensors: for Gemma 4 E2B's 9.4 GB per-layer embedder it
peaked at 11.5 GB with int8 channels and 21.2 GB with int4 blocks of 32, on a 24 GB machine. Every scheme it
applies to a lookup's table is row by row (a scale per row, scales per block of a row, or a float16 cast of each
value), so the same recipe applied to each slice of rows gives the same rows and scales as applied to the whole
table (``tests/test_export_hf.py`` checks it). Each slice goes through the quantizer as a lookup of its own rows;
the quantized rows, and the block scales or per-row scales, are then joined in the first slice's quantized
structure and written past its flatbuffer (``tflite_file.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_quant_pipeline import tflite_file

SLICE_BYTES = 256 * 2**20  # of float32 rows: 7,490 rows of Gemma 4 E2B's per-layer table


def quantize_lookup_tflite(
    source: Path, quantize: Callable[[Path, Path], object], output: Path, slice_bytes: int = SLICE_BYTES
) -> Path:
    """The lookup at ``source`` with each slice of its table's rows quantized by ``quantize(float file, output)``
    (ai-edge-quantizer with the embedder's recipe), joined at ``output``."""
    model = tflite_file.read_structure(source)
    table_index, rows, width = _float_table(model)
    table = tflite_file.buffer_array(source, model, table_index, np.float32, (rows, width))
    rows_per_slice = max(1, slice_bytes // (4 * width))
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as scratch:
        parts = _QuantizedParts(Path(scratch))
        for start in range(0, rows, rows_per_slice):
            parts.add(_quantized_slice(source, table[start : start + rows_per_slice], quantize, parts.folder))
        parts.write(rows, output)
    return output


def _float_table(model) -> tuple[int, int, int]:
    """The lookup's table: its largest constant tensor, float32 [rows, width]."""
    float32 = tflite_file.schema().TensorType.FLOAT32
    tables = [
        (model.buffers[t.buffer].size or np.asarray(model.buffers[t.buffer].data).size, t)
        for subgraph in model.subgraphs
        for t in subgraph.tensors
        if t.buffer and t.type == float32 and len(t.shape) == 2
    ]
    _, table = max(tables, key=lambda pair: pair[0])
    return table.buffer, int(table.shape[0]), int(table.shape[1])


def _quantized_slice(source: Path, rows: np.ndarray, quantize: Callable[[Path, Path], object], folder: Path):
    """The lookup with ``rows`` as its table, quantized: its structure, as ai-edge-quantizer wrote it."""
    model = tflite_file.read_structure(source)
    table_index, table_rows, _ = _float_table(model)
    tflite_file.row_buffers(model, table_rows, len(rows))
    model.buffers[table_index].data = np.frombuffer(np.ascontiguousarray(rows).tobytes(), np.uint8)
    model.buffers[table_index].offset = model.buffers[table_index].size = 0
    float_slice, quantized = folder / "slice.tflite", folder / "slice.quantized.tflite"
    tflite_file.write(model, {}, float_slice)
    quantize(float_slice, quantized)
    return tflite_file.schema().ModelT.InitFromPackedBuf(quantized.read_bytes(), 0), len(rows)


class _QuantizedParts:
    """The quantized slices' row buffers (in files, in order) and per-row scales, joined into the first slice's
    structure."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.template = None
        self.template_rows = 0
        self.files: dict[str, Path] = {}  # by tensor name: its buffer's bytes so far
        # by tensor name: per-row scales and zero points (channels of axis 0)
        self.channels: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, quantized: tuple) -> None:
        model, rows = quantized
        if self.template is None:
            self.template, self.template_rows = model, rows
        row_buffers = tflite_file.row_buffers(model, rows)
        for subgraph in model.subgraphs:
            for tensor in subgraph.tensors:
                if tensor.buffer not in row_buffers or tensor.shape[0] != rows:
                    continue
                name = tensor.name.decode()
                if name not in self.files:
                    self.files[name] = self.folder / f"{len(self.files)}.bin"
                with self.files[name].open("ab") as file:
                    file.write(np.asarray(model.buffers[tensor.buffer].data).tobytes())
                quantization = tensor.quantization
                if quantization is not None and quantization.scale is not None and len(quantization.scale) == rows:
                    channels = (np.asarray(quantization.scale), np.asarray(quantization.zeroPoint))
                    self.channels.setdefault(name, []).append(channels)

    def write(self, rows: int, output: Path) -> None:
        model, appended = self.template, {}
        tflite_file.row_buffers(model, self.template_rows, rows)
        for subgraph in model.subgraphs:
            for tensor in subgraph.tensors:
                name = tensor.name.decode()
                if name in self.channels:
                    scales, zero_points = zip(*self.channels[name], strict=True)
                    tensor.quantization.scale = np.concatenate(scales)
                    tensor.quantization.zeroPoint = np.concatenate(zero_points)
                if name in self.files and tensor.buffer not in appended:
                    appended[tensor.buffer] = (self.files[name].stat().st_size, _chunks(self.files[name]))
        tflite_file.write(model, appended, output)


def _chunks(path: Path, size: int = 64 * 2**20):
    def read():
        with path.open("rb") as file:
            yield from iter(lambda: file.read(size), b"")

    return read
