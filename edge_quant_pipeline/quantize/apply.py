"""A recipe applied to the float ``.tflite`` by ai-edge-quantizer, as ``litert_torch.convert(...,
quant_config=...)`` does after its export: the expensive export runs once per checkpoint and each recipe
costs only this pass; the bytes are the same (``tests/test_convert.py``). Needs neither torch nor TensorFlow.
Three workarounds of ai-edge-quantizer 0.10 and ai-edge-litert 2.3 are applied around its run (each says why)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_quant_pipeline.atomic import link_or_copy, write_atomically
from edge_quant_pipeline.embedders import embedder_path, embedders_of
from edge_quant_pipeline.memory import return_freed_memory
from edge_quant_pipeline.quantize.lookup import quantize_lookup_tflite


class QuantizationError(RuntimeError):
    """ai-edge-quantizer rejected a recipe for this model."""


@contextmanager
def _array_equality_by_numpy() -> Iterator[None]:
    """ai-edge-quantizer 0.10 (``qtyping._compare_array_or_none``) compares quantized tensors with ``a.data ==
    b.data``, a memoryview comparison that for float16 unpacks every element one by one: 80% of an fp16
    quantization, which took 296 s for a 0.5B model (9 s for int8). ``np.array_equal`` gives the same answer
    (its fallback there) in milliseconds; ``tests/test_convert.py`` checks the bytes against litert-torch's own
    convert, which runs unpatched."""
    import numpy as np
    from ai_edge_quantizer import qtyping

    def compare_array_or_none(a, b) -> bool:
        return a is b or (a is not None and b is not None and np.array_equal(a, b))

    original = qtyping._compare_array_or_none
    qtyping._compare_array_or_none = compare_array_or_none
    try:
        yield
    finally:
        qtyping._compare_array_or_none = original


# The smallest normal float16. XNNPACK refuses a blockwise scale that is not a normal float16 ("unsupported scale
# value (0.000000) in channel 0 for INT4 tensor"), and blockwise scales are stored as float16.
SMALLEST_BLOCK_SCALE = 2.0**-14


@contextmanager
def _normal_block_scales() -> Iterator[None]:
    """ai-edge-quantizer 0.10 gives a block whose weights are all zero (the padding row transformers initializes
    to zero, rows a checkpoint never trained) the scale 1e-9 / qmax, which rounds to 0 in float16, and any block
    with max |w| below 2^-14 x qmax a subnormal one; XNNPACK refuses the file either way. Such blocks get the
    smallest normal float16 scale instead, as other toolchains clamp theirs: their weights, at most that scale x
    qmax, still quantize within range, and every other block is quantized exactly as before."""
    import numpy as np
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as tensors

    original = tensors.tensor_zp_scale_from_min_max

    def zp_scale(min_value, max_value, num_bits, symmetric, granularity, *args, **kwargs):
        zp, scale = original(min_value, max_value, num_bits, symmetric, granularity, *args, **kwargs)
        if symmetric and tensors.is_blockwise(granularity):  # a zero point would have to follow the scale
            scale = np.maximum(scale, SMALLEST_BLOCK_SCALE).astype(np.float32)
        return zp, scale

    tensors.tensor_zp_scale_from_min_max = zp_scale
    try:
        yield
    finally:
        tensors.tensor_zp_scale_from_min_max = original


@contextmanager
def _mapped_files_closed() -> Iterator[None]:
    """ai-edge-litert 2.3's ``mmap_utils.get_file_contents``, which the quantizer reads its input with, maps the file
    and never closes the descriptor it opened to map it (the map keeps one of its own): every file the quantizer
    reads stays open until the process exits, and one deleted since keeps its disk. Gemma 4 E2B's 9.4 GB per-layer
    table, quantized 256 MB of rows at a time (``lookup.py``), left 43 deleted slices open (11 GB) and filled the
    disk. The same map, its descriptor closed once mapped (``tests/test_export_hf.py``)."""
    import mmap

    from ai_edge_litert.tools import mmap_utils

    original = mmap_utils.get_file_contents

    def get_file_contents(path, *, offset: int = 0, size: int = 0) -> memoryview:
        below = offset & (mmap.ALLOCATIONGRANULARITY - 1)
        try:
            with open(path, "rb") as file:
                pages = mmap.mmap(
                    file.fileno(), size + below if size else 0, access=mmap.ACCESS_COPY, offset=offset - below
                )
        except OSError:  # not a file that maps: the original reads it into memory
            return original(path, offset=offset, size=size)
        return memoryview(pages)[below:]

    mmap_utils.get_file_contents = get_file_contents
    try:
        yield
    finally:
        mmap_utils.get_file_contents = original


def quantize_tflite(
    float_tflite: Path,
    quantizer_recipe: list[dict[str, Any]],
    output: Path,
    calibration: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Apply an ai-edge-quantizer recipe to a float flatbuffer; needs neither torch nor TF. ``calibration``: the
    statistics static activations and GPTQ need (``quantize/calibration.py``), keyed by tensor name."""
    from ai_edge_quantizer import quantizer

    try:
        with _array_equality_by_numpy(), _normal_block_scales(), _mapped_files_closed():
            # A path: the quantizer maps the file instead of taking a copy of it.
            result = quantizer.Quantizer(float_tflite, quantizer_recipe).quantize(
                calibration,
                enable_progress_bar=False,
                enable_progress_report=False,  # its own prints; the run logs the sizes
            )
    except Exception as error:  # the quantizer raises bare ValueError/RuntimeError for unsupported shapes
        raise QuantizationError(f"ai-edge-quantizer rejected the recipe for {float_tflite}: {error}") from error
    write_atomically(output, result.quantized_model)  # a bytearray, written without a copy
    del result
    return_freed_memory()  # the parsed and the quantized model: hand their memory back before evaluation
    return output


def quantize_model(
    float_tflite: Path,
    quantizer_recipe: list[dict[str, Any]],
    embedder_recipe: list[dict[str, Any]],
    output: Path,
    calibration: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """The model with ``quantizer_recipe`` and each of its embedders (``embedders.py``) with ``embedder_recipe``,
    the embedders first (``output`` existing means they do); an empty recipe keeps a file's float bytes.
    ``calibration`` is for the model itself: embedders are lookups, which no calibrated scheme applies to."""

    def quantize_embedder_slice(float_slice: Path, quantized: Path) -> Path:
        return quantize_tflite(float_slice, embedder_recipe, quantized)

    for role, source in embedders_of(float_tflite).items():
        if not embedder_recipe:
            link_or_copy(source, embedder_path(output, role))
        else:  # a slice of rows at a time: ai-edge-quantizer takes twice a table's size to quantize it whole
            quantize_lookup_tflite(source, quantize_embedder_slice, embedder_path(output, role))
    if not quantizer_recipe:
        return link_or_copy(float_tflite, output)
    return quantize_tflite(float_tflite, quantizer_recipe, output, calibration)
