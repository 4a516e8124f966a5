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

import mmap
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
    pages = tflite_file.mapped(source)
    model = tflite_file.read_structure(pages)
    table_index, rows, width = _float_table(model)
    _inline(model, pages, but=[table_index])  # each slice's file holds them itself
    table = tflite_file.buffer_array(pages, model, table_index, np.float32, (rows, width))
    rows_per_slice = max(1, slice_bytes // (4 * width))
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as scratch:
        parts = _QuantizedParts(Path(scratch))
        for start in range(0, rows, rows_per_slice):
            slice_rows = min(rows_per_slice, rows - start)
            float_slice = _float_slice(model, table_index, table[start : start + slice_rows], parts.folder)
            pages.madvise(mmap.MADV_DONTNEED)  # the rows read: this process's memory stays one slice's
            quantized = parts.folder / "slice.quantized.tflite"
            quantize(float_slice, quantized)
            parts.add(tflite_file.mapped(quantized), slice_rows)
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


def _float_slice(model, table_index: int, rows: np.ndarray, folder: Path) -> Path:
    """The lookup with ``rows`` as its whole table, written inline (``model`` re-shaped for it)."""
    tflite_file.row_buffers(model, _table_rows(model, table_index), len(rows))
    model.buffers[table_index].data = np.frombuffer(rows.tobytes(), np.uint8)
    model.buffers[table_index].offset = model.buffers[table_index].size = 0
    tflite_file.write(model, {}, folder / "slice.tflite")
    return folder / "slice.tflite"


def _table_rows(model, table_index: int) -> int:
    return next(int(t.shape[0]) for sg in model.subgraphs for t in sg.tensors if t.buffer == table_index)


class _QuantizedParts:
    """The quantized slices' row buffers (in files, in order) and per-row scales, joined into the first slice's
    structure. Every slice has the same structure: the same buffers and tensors, at the same indices."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.template = None  # the first slice's structure, its buffers other than the rows' inline
        self.template_rows = 0
        self.rows_of: dict[int, Path] = {}  # by buffer: the file of its rows' bytes so far
        # by (subgraph, tensor): per-row scales and zero points, when its channels are rows
        self.channels: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, pages: mmap.mmap, rows: int) -> None:
        """A quantized slice of ``rows`` rows, as ai-edge-quantizer wrote it (its buffers inline or past its
        flatbuffer)."""
        model = tflite_file.read_structure(pages)
        row_buffers = tflite_file.row_buffers(model, rows)
        for index in row_buffers:
            with self.rows_of.setdefault(index, self.folder / f"buffer-{index}.bin").open("ab") as file:
                file.write(tflite_file.buffer_array(pages, model, index).tobytes())
        for place, tensor in _tensors(model):
            quantization = tensor.quantization
            if tensor.buffer in row_buffers and quantization is not None and quantization.scale is not None:
                if len(quantization.scale) == rows:
                    channels = (np.asarray(quantization.scale), np.asarray(quantization.zeroPoint))
                    self.channels.setdefault(place, []).append(channels)
        if self.template is None:
            self.template, self.template_rows = _inline(model, pages, but=row_buffers), rows

    def write(self, rows: int, output: Path) -> None:
        model = self.template
        tflite_file.row_buffers(model, self.template_rows, rows)
        for place, tensor in _tensors(model):
            if place in self.channels:
                scales, zero_points = zip(*self.channels[place], strict=True)
                tensor.quantization.scale = np.concatenate(scales)
                tensor.quantization.zeroPoint = np.concatenate(zero_points)
        appended = {index: (file.stat().st_size, _chunks(file)) for index, file in self.rows_of.items()}
        tflite_file.write(model, appended, output)


def _tensors(model):
    for s, subgraph in enumerate(model.subgraphs):
        for t, tensor in enumerate(subgraph.tensors):
            yield (s, t), tensor


def _inline(model, pages: mmap.mmap, but: list[int]):
    """``model`` with every buffer but ``but`` copied out of its file into the structure (a quantized slice's file is
    replaced by the next slice's)."""
    for index, buffer in enumerate(model.buffers):
        if index not in but and buffer.offset > 1:
            buffer.data = tflite_file.buffer_array(pages, model, index).copy()
            buffer.offset = buffer.size = 0
    return model


def _chunks(path: Path, size: int = 64 * 2**20):
    def read():
        with path.open("rb") as file:
            yield from iter(lambda: file.read(size), b"")

    return read
