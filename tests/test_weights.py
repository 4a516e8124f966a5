"""Weight bytes as the .tflite stores them, checked against the files' real sizes."""

import pytest

from edge_quant_pipeline.checkpoints import architecture_of, load_float_model, read_checkpoint
from edge_quant_pipeline.convert import ExportSettings, export_float_tflite, quantize_tflite
from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES, ai_edge_quantizer_recipe
from edge_quant_pipeline.weights import inspect_tflite

# Per weight tensor of the graph, what a quantized file may hold beyond what the float one does, besides its
# weights: a Quantization table, a DEQUANTIZE op and its output (weight-only, fp16), a scale tensor (int4), with
# their names. Measured 113-360 bytes on the demo model; the int64 zero points left out were 2,048 per tensor.
BOOKKEEPING_PER_TENSOR = 512


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_checkpoint_dir):
    checkpoint = read_checkpoint(demo_checkpoint_dir)
    architecture = architecture_of(checkpoint)
    model = load_float_model(checkpoint, ExportSettings.kv_cache_len)
    output = tmp_path_factory.mktemp("weights") / "float.tflite"
    return architecture, export_float_tflite(model, architecture.model_config, ExportSettings(), output)


@pytest.mark.parametrize("recipe", [name for name in BUILTIN_RECIPES if name != "float"])
def test_weight_bytes_are_what_the_file_stores(demo, tmp_path, recipe):
    """The file shrinks by the weight bytes it no longer stores: everything else in it (ops, names, the float
    mask and RoPE tables) is the float file's, give or take a little bookkeeping per weight tensor."""
    architecture, float_path = demo
    quantized_path = quantize_tflite(
        float_path,
        ai_edge_quantizer_recipe(BUILTIN_RECIPES[recipe], architecture.tied_lm_head),
        tmp_path / "model.tflite",
    )
    float_model, quantized = inspect_tflite(float_path), inspect_tflite(quantized_path)
    other_in_float = float_model.file_bytes - float_model.weight_bytes
    other_in_quantized = quantized.file_bytes - quantized.weight_bytes
    tensors = 2 * len({w.buffer for w in quantized.weights})  # each weight has a tensor in prefill and in decode
    assert abs(other_in_quantized - other_in_float) <= BOOKKEEPING_PER_TENSOR * tensors
