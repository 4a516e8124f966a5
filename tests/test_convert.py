"""Export once, quantize per recipe: the same bytes as litert-torch's one-shot convert."""

import pytest

from edge_quant_pipeline.checkpoints.validate import read_checkpoint
from edge_quant_pipeline.export.load import load_float_model
from edge_quant_pipeline.quantize.apply import quantize_tflite
from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe
from edge_quant_pipeline.shapes import ExportSettings

pytestmark = pytest.mark.families


@pytest.fixture(scope="module")
def float_export(demo_export, demo_checkpoint_dir):
    """The session's export of the demo, and the PyTorch model it was exported from."""
    architecture, float_tflite = demo_export
    model = load_float_model(read_checkpoint(demo_checkpoint_dir), ExportSettings.kv_cache_len)
    return model, architecture.model_config, float_tflite


@pytest.mark.parametrize("recipe", ["dynamic_int8", "fp16"])
def test_quantizing_the_float_export_equals_one_shot_convert(float_export, tmp_path, recipe):
    from litert_torch.generative.utilities import converter

    model, model_config, float_tflite = float_export
    ours = quantize_tflite(
        float_tflite,
        ai_edge_quantizer_recipe(BUILTIN_RECIPES[recipe], model_config.lm_head_share_weight_with_embedding),
        tmp_path / "ours.tflite",
    )
    # litert-torch's own path: convert with quantization in one call.
    upstream = converter.convert_to_tflite(
        model,
        output_path=str(tmp_path),
        output_name_prefix="upstream",
        prefill_seq_len=ExportSettings.prefill_len,
        kv_cache_max_len=ExportSettings.kv_cache_len,
        quantize=recipe,
        config=model_config,
        export_config=converter.ExportConfig(output_logits_on_prefill=True),
    )
    assert ours.read_bytes() == open(upstream, "rb").read()
