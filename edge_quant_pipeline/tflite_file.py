"""``.tflite`` files whose large buffers lie past the flatbuffer, written and read a slice at a time.

A TFLite flatbuffer cannot exceed 2 GB, so a model's large buffers may instead give an ``offset`` into the file and
a ``size`` (as litert-torch writes models above 2 GB, and TFLite reads them). Gemma 4 E2B's per-layer embedding
table is 9.4 GB in float32: written this way (``export/lookup_table.py``) and quantized this way
(``quantize/lookup.py``), it is never whole in memory.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from edge_quant_pipeline.atomic import atomic_path

_ALIGNMENT = 64


def schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def read_structure(pages: mmap.mmap):
    """A file's flatbuffer as an object tree (``ModelT``), read from its ``mapped`` pages: its inline buffers are
    views of them, buffers with an offset keep only their offset."""
    return schema().ModelT.InitFromPackedBuf(pages, 0)


def mapped(path: Path) -> mmap.mmap:
    """The file's pages, read-only: nothing read until used; ``madvise(mmap.MADV_DONTNEED)`` drops those read."""
    with path.open("rb") as file:
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)


def buffer_array(pages: mmap.mmap, model, index: int, dtype=np.uint8, shape: tuple[int, ...] | None = None):
    """A buffer, inline or with an offset, as an array of the file's ``pages`` (bytes, without a ``shape``)."""
    buffer = model.buffers[index]
    if buffer.offset > 1:
        data = np.frombuffer(pages, np.uint8, buffer.size, buffer.offset)
    else:
        data = np.asarray(buffer.data if buffer.data is not None else [], np.uint8)
    return data.view(dtype) if shape is None else data.view(dtype).reshape(shape)


def write(model, appended: dict[int, tuple[int, Callable[[], Iterable[bytes]]]], output: Path) -> None:
    """``model`` with each buffer of ``appended`` (index: its size in bytes and the slices of its bytes, in order)
    placed past the flatbuffer, one after the other."""
    for index, (size, _) in appended.items():
        model.buffers[index].data = None
        model.buffers[index].offset, model.buffers[index].size = 1, size  # sized before placed
    offset = _aligned(len(_packed(model)))
    for index, (size, _) in appended.items():
        model.buffers[index].offset = offset
        offset = _aligned(offset + size)
    packed = _packed(model)
    with atomic_path(output) as partial, partial.open("wb") as file:  # whole or not at all
        file.write(packed)
        for index, (size, slices) in appended.items():
            file.write(b"\0" * (model.buffers[index].offset - file.tell()))
            written = sum(file.write(piece) for piece in slices())
            if written != size:
                raise RuntimeError(f"{output}: buffer {index} got {written} bytes, {size} expected")


def row_buffers(model, rows: int, new_rows: int | None = None) -> list[int]:
    """The buffers of the constant tensors of ``rows`` rows (a lookup's table, and its block scales once quantized;
    the same buffers in every signature), those tensors re-shaped to ``new_rows`` rows if given."""
    buffers = []
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            buffer = model.buffers[tensor.buffer]
            constant = tensor.buffer and (buffer.data is not None or buffer.offset > 1)
            if constant and len(tensor.shape) == 2 and tensor.shape[0] == rows:
                buffers += [] if tensor.buffer in buffers else [tensor.buffer]
                if new_rows is not None:
                    tensor.shape = np.array([new_rows, tensor.shape[1]], dtype=np.int32)
                    tensor.shapeSignature = None
    if not buffers:
        raise RuntimeError(f"no table of {rows} rows in the lookup")
    return buffers


def _packed(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _aligned(size: int) -> int:
    return -(-size // _ALIGNMENT) * _ALIGNMENT
