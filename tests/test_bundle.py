"""LiteRT-LM bundles, packed from the demo's files and run in the LiteRT-LM runtime itself (no stand-in)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import DEMO_MODEL, metadata

from edge_quant_pipeline.evaluate.bundle import BundleError, build_bundle, bundle_path, bundle_spec
from edge_quant_pipeline.evaluate.litert_lm import BundleRejectedError, run_bundle
from edge_quant_pipeline.publish.store import BUNDLE_FILE, MANIFEST
from edge_quant_pipeline.runtime.session import InterpreterSession
from edge_quant_pipeline.settings import DEFAULT_EVAL_TEXT, GENERATIVE_API
from edge_quant_pipeline.shapes import ExportSettings

SETTINGS = ExportSettings()  # the demo's: prefill 32, KV cache 128


def test_every_recipe_of_the_demo_is_bundled_and_runs_in_litert_lm(golden, golden_instance):
    instance = golden_instance
    assert golden.summary.failures == 0
    for recipe in golden.recipes:
        measured = metadata(instance, "evaluation", f"{DEMO_MODEL}|{recipe}")
        assert measured["litert_lm_error"] == "", recipe
        assert measured["litert_lm_prompt_tokens"] == SETTINGS.prefill_len  # the demo has no start token
        assert measured["litert_lm_decode_tokens_per_s"] > 0 and measured["litert_lm_time_to_first_token_ms"] > 0
        assert measured["litert_lm_peak_rss_mb"] > 0
    # the runtime computes what the interpreter computes, token for token
    for recipe in ("float", "dynamic_int8"):
        measured = metadata(instance, "evaluation", f"{DEMO_MODEL}|{recipe}")
        assert measured["litert_lm_interpreter_agreement"] == 1.0, recipe
    assert metadata(instance, "evaluation", f"{DEMO_MODEL}|float")["litert_lm_float_agreement"] == 1.0


def test_the_bundle_is_published_beside_the_model_with_its_hash(golden):
    recipe_dir = golden.pipeline.store / DEMO_MODEL / "dynamic_int8"
    version = recipe_dir / json.loads((recipe_dir / "latest.json").read_text())["version"]
    manifest = json.loads((version / MANIFEST).read_text())
    assert manifest["bundle_sha256"] == hashlib.sha256((version / BUNDLE_FILE).read_bytes()).hexdigest()
    assert manifest["bundle_builder"].startswith("litert-lm-builder==")
    assert manifest["metrics"]["litert_lm_decode_tokens_per_s"] > 0  # the runtime's numbers are in it too


@pytest.fixture(scope="module")
def demo_float(demo_export, tmp_path_factory):
    """The demo's float .tflite, alone in a folder of this module's."""
    tflite = demo_export[1]
    folder = tmp_path_factory.mktemp("bundle")
    return shutil.copy(tflite, folder / "model.tflite")


def test_litert_lm_generates_what_the_interpreter_generates(demo_float, demo_checkpoint_dir):
    spec = bundle_spec(demo_checkpoint_dir, json.loads((demo_checkpoint_dir / "config.json").read_text()), 128)
    assert spec.stop_token_ids == (10,) and spec.start_token_id is None  # a newline ends a reply
    bundle = build_bundle(demo_float, spec, GENERATIVE_API, bundle_path(demo_float))
    text = DEFAULT_EVAL_TEXT.read_text()[: SETTINGS.prefill_len]
    run = run_bundle(bundle, [text, text[1:]], 12)
    with InterpreterSession(demo_float, SETTINGS, num_threads=2) as session:
        expected = session.greedy(np.frombuffer(text.encode(), np.uint8).astype(np.int32), 12)
    generated = list(run.texts[0].encode())  # the demo's tokens are its bytes
    assert generated == expected.tolist()[: len(generated)] and len(generated) > 0
    assert run.prompt_tokens == SETTINGS.prefill_len and len(run.texts) == 2 and run.texts[1]
    # the runtime's XNNPACK cache (as large as the packed weights) does not outlive the run
    assert {p.name for p in demo_float.parent.iterdir()} == {"model.tflite", "model.litertlm"}


def test_a_bundle_without_executor_metadata_is_caught(tmp_path, demo_float, demo_checkpoint_dir):
    """LiteRT-LM loads it without a word, then reads the context length from the wrong axis of the KV cache."""
    spec = bundle_spec(demo_checkpoint_dir, json.loads((demo_checkpoint_dir / "config.json").read_text()), 128)
    bundle = build_bundle(demo_float, spec, GENERATIVE_API, tmp_path / "no-metadata.litertlm", False)
    with pytest.raises(BundleRejectedError, match="Input token ids are too long"):
        run_bundle(bundle, [DEFAULT_EVAL_TEXT.read_text()[:32]], 8)


def test_a_checkpoint_without_what_a_bundle_needs_is_refused_with_the_file_to_fix(tmp_path, demo_checkpoint_dir):
    folder = shutil.copytree(demo_checkpoint_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "generation_config.json").write_text("{}")
    with pytest.raises(BundleError, match=r"generation_config\.json: no eos_token_id"):
        bundle_spec(folder, config, 128)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        bundle_spec(folder, config, 128)
