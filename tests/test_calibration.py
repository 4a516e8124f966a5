"""Calibration statistics: what ai-edge-quantizer's own calibrator computes, at the cost of one run of the model;
and where they enter an artifact's version."""

import numpy as np
import pytest

from edge_quant_pipeline.evaluate.reference import tokenize
from edge_quant_pipeline.quantize.calibration import (
    CalibrationTextError,
    calibration_windows,
    fully_connected_layers,
    quantizer_calibration,
)
from edge_quant_pipeline.quantize.schemes import Quantization
from edge_quant_pipeline.settings import DEFAULT_CALIBRATION_TEXT
from edge_quant_pipeline.shapes import ExportSettings


def test_statistics_equal_ai_edge_quantizers_calibrator_on_the_same_calls(demo_export, demo_calibration):
    """The same prefill calls (4 windows, KV cache carried chunk to chunk) through ai-edge-quantizer's Calibrator
    give the same input Hessians as our statistics (GPTQ on every layer) and the same ranges (min_max_update, the
    update it offers beside its default moving average)."""
    from ai_edge_quantizer.utils import qsv_utils

    _, float_tflite = demo_export
    hessians = _their_statistics(float_tflite, demo_calibration.samples, Quantization("int8_dynamic", "gptq"))
    ranges = _their_statistics(
        float_tflite, demo_calibration.samples, Quantization("int8_static_a16"), qsv_utils.min_max_update
    )
    ours = quantizer_calibration(demo_calibration, float_tflite, hessians=True)
    for layer in fully_connected_layers(float_tflite)[ExportSettings().prefill_signature]:
        for name in (layer.input_name, layer.output_name):
            np.testing.assert_allclose(
                ours[name]["min"], ranges[name]["min"].reshape(ours[name]["min"].shape), rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                ours[name]["max"], ranges[name]["max"].reshape(ours[name]["max"].shape), rtol=1e-4, atol=1e-5
            )
        np.testing.assert_allclose(
            ours[layer.input_name]["hessian"], hessians[layer.input_name]["hessian"], rtol=1e-3, atol=1e-3
        )
        assert int(ours[layer.input_name]["num_samples"]) == int(hessians[layer.input_name]["num_samples"])


def _their_statistics(float_tflite, samples: int, quantization: Quantization, update=None) -> dict:
    """ai-edge-quantizer's Calibrator on every fully-connected layer with ``quantization``, over the calls ours
    makes."""
    from ai_edge_quantizer import calibrator, qtyping, recipe_manager

    settings = ExportSettings()
    manager = recipe_manager.RecipeManager()
    manager.add_quantization_config(
        ".*", qtyping.TFLOperationName.FULLY_CONNECTED, quantization.op_config(), quantization.algorithm_key
    )
    extra = {"qsv_update_func": update} if update else {}
    theirs = calibrator.Calibrator(float_tflite.read_bytes(), num_threads=2, **extra)
    tokens = tokenize(DEFAULT_CALIBRATION_TEXT, float_tflite.parent, 256)
    for window in calibration_windows(tokens, settings, samples, DEFAULT_CALIBRATION_TEXT):
        cache = {}
        for start in range(0, len(window), settings.prefill_len):
            inputs = {
                "tokens": window[None, start : start + settings.prefill_len].astype(np.int32),
                "input_pos": np.arange(start, start + settings.prefill_len, dtype=np.int32),
                **cache,
            }
            if not cache:  # an empty cache: zeros of each input's shape
                shapes = {n: d["shape"] for n, d in _inputs(float_tflite, settings).items() if n.startswith("kv_")}
                inputs.update({n: np.zeros(s, np.float32) for n, s in shapes.items()})
            theirs.calibrate({settings.prefill_signature: [inputs]}, manager, cache_output=True)
            outputs = theirs.get_cached_output()[-1]
            theirs.clear_cached_output()
            cache = {n: outputs[n] for n in inputs if n.startswith("kv_cache_")}
    return theirs.get_model_qsvs()


def _inputs(float_tflite, settings):
    from ai_edge_litert.interpreter import Interpreter

    return (
        Interpreter(model_path=str(float_tflite)).get_signature_runner(settings.prefill_signature).get_input_details()
    )


def test_decode_layers_get_the_statistics_of_the_prefill_layer_with_their_weights(demo_export, demo_calibration):
    _, float_tflite = demo_export
    layers = fully_connected_layers(float_tflite)
    result = quantizer_calibration(demo_calibration, float_tflite, hessians=False)
    prefill = {layer.weight_buffer: layer for layer in layers["prefill_32"]}
    assert layers["decode"] and len(layers["decode"]) == len(layers["prefill_32"])
    for layer in layers["decode"]:
        source = prefill[layer.weight_buffer]
        assert result[layer.input_name]["max"].item() == result[source.input_name]["max"].item()
        assert result[layer.input_name]["max"].shape == (1,) * len(layer.input_shape)
        assert "hessian" not in result[layer.input_name]


def test_a_text_too_short_names_the_file_the_count_and_the_fix(tmp_path):
    text = tmp_path / "short.txt"
    with pytest.raises(CalibrationTextError) as error:
        calibration_windows(np.arange(300), ExportSettings(), 8, text)
    assert str(error.value) == (
        f"{text}: 300 tokens with this checkpoint's tokenizer; calibration_samples=8 needs 1024 (8 windows of 128). "
        "Use a longer text (EDGE_QUANT_CALIBRATION_TEXT) or fewer samples."
    )


def test_calibration_enters_the_version_of_calibrated_recipes_only(tmp_path):
    """A new calibration text makes new versions of static and GPTQ recipes, and no other."""
    from edge_quant_pipeline.checkpoints.validate import read_checkpoint
    from edge_quant_pipeline.config import ArtifactStore, CalibrationConfig, PipelineConfig
    from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES, parse_recipe
    from edge_quant_pipeline.settings import DEMO_CHECKPOINT_DIR
    from edge_quant_pipeline.versions import artifact_inputs

    checkpoint = read_checkpoint(DEMO_CHECKPOINT_DIR / "tiny-llama-bytes")
    other_text = tmp_path / "calibration.txt"
    other_text.write_text("Some other prose to calibrate on. " * 100)
    pipelines = [
        PipelineConfig(checkpoint_dir=".", work_dir=str(tmp_path), artifact_store=ArtifactStore(url=str(tmp_path)), **k)
        for k in ({}, {"calibration": CalibrationConfig(text=str(other_text))})
    ]
    static = parse_recipe("static", {"default": "int8_static_a8", "embedding": "int8_dynamic"}, "test")
    int8 = BUILTIN_RECIPES["dynamic_int8"]
    before, after = (artifact_inputs(p, checkpoint, static) for p in pipelines)
    assert before.version != after.version
    assert (
        after.identity()["calibration"]["calibration_text_sha256"]
        != before.identity()["calibration"]["calibration_text_sha256"]
    )
    plain_before, plain_after = (artifact_inputs(p, checkpoint, int8) for p in pipelines)
    assert plain_before.version == plain_after.version and "calibration" not in plain_before.identity()


def test_a_catalog_that_needs_more_statistics_makes_only_calibration_stale(tmp_path):
    """What calibration computes (nothing, ranges, Hessians) is in its code version: adding a static recipe to
    recipes.yaml re-runs every checkpoint's calibration, and no other model-level asset."""
    from edge_quant_pipeline.config import ArtifactStore, PipelineConfig
    from edge_quant_pipeline.settings import DEMO_CHECKPOINT_DIR
    from edge_quant_pipeline.versions import model_code_versions

    static = tmp_path / "recipes.yaml"
    static.write_text("recipes:\n  s: {default: int8_static_a16, embedding: int8_dynamic}\n")
    before, after = (
        model_code_versions(
            PipelineConfig(
                checkpoint_dir=str(DEMO_CHECKPOINT_DIR),
                work_dir=str(tmp_path),
                artifact_store=ArtifactStore(url=str(tmp_path)),
                recipes_file=str(recipes),
            )
        )
        for recipes in (tmp_path / "none.yaml", static)
    )
    assert {name for name in before if before[name] != after[name]} == {"calibration"}
    assert "computes=none" in before["calibration"] and "computes=ranges" in after["calibration"]
