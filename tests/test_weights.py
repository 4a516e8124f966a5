"""Weight bytes as the .tflite stores them, checked against the files' real sizes."""

import shutil
from dataclasses import replace

import pytest

from edge_quant_pipeline.atomic import link_or_copy
from edge_quant_pipeline.quantize.apply import quantize_tflite
from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES, parse_recipe
from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe
from edge_quant_pipeline.weights import inspect_tflite

# Per weight tensor of the graph, what a quantized file may hold beyond what the float one does, besides its
# weights: a Quantization table, a DEQUANTIZE op and its output (weight-only, fp16), a scale tensor (int4), with
# their names. Measured 113-360 bytes on the demo model; the int64 zero points left out were 2,048 per tensor.
BOOKKEEPING_PER_TENSOR = 512
# A Hadamard rotation inserts, per rotated layer and signature, three ops and five tensors (shapes, the reshaped and
# rotated activations), each named after the layer's input: 1.3 KB per rotated weight measured on the demo.
BOOKKEEPING_PER_ROTATION = 1536


HADAMARD = parse_recipe("hadamard", {"default": "int4_dynamic+hadamard"}, "test")
RECIPES = [*(recipe for name, recipe in BUILTIN_RECIPES.items() if name != "float"), HADAMARD]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_weight_bytes_are_what_the_file_stores(demo_export, tmp_path, recipe):
    """The file shrinks by the weight bytes it no longer stores: everything else in it (ops, names, the float
    mask and RoPE tables) is the float file's, give or take a little bookkeeping per weight tensor (a Hadamard
    rotation's matrices are weights it stores)."""
    architecture, float_path = demo_export
    quantized_path = quantize_tflite(
        float_path, ai_edge_quantizer_recipe(recipe, architecture.tied_lm_head), tmp_path / "model.tflite"
    )
    float_model, quantized = inspect_tflite(float_path), inspect_tflite(quantized_path)
    other_in_float = float_model.file_bytes - float_model.weight_bytes
    other_in_quantized = quantized.file_bytes - quantized.weight_bytes
    tensors = 2 * len({w.buffer for w in quantized.weights})  # each weight has a tensor in prefill and in decode
    rotations = 2 * len({w.buffer for w in quantized.weights if w.rotated})
    bookkeeping = BOOKKEEPING_PER_TENSOR * tensors + BOOKKEEPING_PER_ROTATION * rotations
    assert abs(other_in_quantized - other_in_float) <= bookkeeping


def test_a_model_is_the_same_bytes_as_its_link_or_copy_and_no_other(demo_export, tmp_path):
    """What lets the `float` recipe's evaluation take the float baseline's task scores: only its very files."""
    _, float_path = demo_export
    model = inspect_tflite(float_path)
    linked = link_or_copy(float_path, tmp_path / "linked.tflite")
    copied = shutil.copyfile(float_path, tmp_path / "copied.tflite")
    changed = bytearray(float_path.read_bytes())
    changed[len(changed) // 2] ^= 1
    (tmp_path / "changed.tflite").write_bytes(changed)
    assert model.same_bytes_as(replace(model, path=linked)) and model.same_bytes_as(replace(model, path=copied))
    assert not model.same_bytes_as(replace(model, path=tmp_path / "changed.tflite"))
    assert not model.same_bytes_as(replace(model, file_bytes=model.file_bytes + 1))
