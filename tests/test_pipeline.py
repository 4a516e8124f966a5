"""The whole asset graph materialized through Dagster for the bundled demo model,
with real conversion, real quantization and the real LiteRT interpreter."""

import json
import os
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from conftest import DEMO_MODEL, metadata, scramble_weights

from edge_quant_pipeline.defs.display import for_ui
from edge_quant_pipeline.weights import read_weights


def key(recipe: str) -> str:
    return str(dg.MultiPartitionKey({"model": DEMO_MODEL, "recipe": recipe}))


def test_every_run_succeeds(golden):
    assert golden.summary.failures == 0


def test_calibration_computes_what_the_catalog_needs(golden_instance):
    # the golden build's catalog has a static recipe and no GPTQ: ranges, no Hessians
    calibration = metadata(golden_instance, "calibration", DEMO_MODEL)
    assert calibration["computed"] == "ranges" and calibration["hessian_mb"] == 0 and calibration["layers"] > 0


def test_demo_model_has_learned_its_text(golden_instance):
    instance = golden_instance
    assert metadata(instance, "float_reference", DEMO_MODEL)["perplexity"] < 20  # uniform over bytes: 256


def test_float_tflite_matches_pytorch(golden_instance):
    instance = golden_instance
    float_eval = metadata(instance, "evaluation", key("float"))
    assert float_eval["perplexity_ratio"] == pytest.approx(1.0, abs=0.01)
    assert float_eval["mean_kl"] < 1e-4
    assert float_eval["top1_agreement"] > 0.999


@pytest.mark.parametrize(
    "recipe, low, high",
    [
        # a byte per weight, and per output channel and signature a float32 scale and an int64 zero point
        ("dynamic_int8", 3.4, 3.5),
        ("weight_only_int8", 3.4, 3.5),
        ("fp16", 1.95, 2.0),
        ("dynamic_int4_block32", 6.0, 8.0),
    ],
)
def test_weight_bytes_shrink_as_the_scheme_says(golden_instance, recipe, low, high):
    instance = golden_instance
    evaluation = metadata(instance, "evaluation", key(recipe))
    assert low <= evaluation["weight_ratio"] <= high
    # float mask and RoPE constants do not shrink, so the whole file shrinks less
    assert 1.0 < evaluation["file_ratio"] < evaluation["weight_ratio"]


def test_quantization_costs_little_quality(golden_instance):
    instance = golden_instance
    int8 = metadata(instance, "evaluation", key("dynamic_int8"))
    int4 = metadata(instance, "evaluation", key("dynamic_int4_block128"))
    assert int8["perplexity_ratio"] < 1.05 and int8["top1_agreement"] > 0.9
    assert int4["mean_kl"] > int8["mean_kl"]


def test_selective_recipe_weights_are_as_specified(golden_instance):
    instance = golden_instance
    artifact = Path(metadata(instance, "published_artifact", key("selective_fp16_int8"))["artifact_path"])
    kinds = {(w.component, w.dtype, w.compute) for w in read_weights(artifact / "model.tflite")}
    assert kinds == {
        ("embedding", "INT8", "integer"),  # int8 dynamic
        ("lm_head", "INT8", "integer"),  # tied to the embedding, so it follows it
        ("attention", "INT8", "float"),  # int8 weight-only: dequantized, float compute
        ("feedforward", "INT8", "integer"),  # int8 dynamic
    }


def test_published_artifacts_carry_lineage(golden_instance):
    instance = golden_instance
    artifact = Path(metadata(instance, "published_artifact", key("fp16"))["artifact_path"])
    assert artifact.parent.name == "fp16" and artifact.parent.parent.name == DEMO_MODEL
    manifest = json.loads((artifact / "manifest.json").read_text())
    checkpoint = metadata(instance, "checkpoint", DEMO_MODEL)
    assert manifest["checkpoint_sha256"] == checkpoint["sha256"]
    assert manifest["recipe_spec"] == {"default": "fp16", "embedding": None, "attention": None, "feedforward": None}
    conversion = {"litert-torch", "ai-edge-quantizer", "ai-edge-litert", "torch"}
    assert set(manifest["toolchain"]) == conversion | {"litert-lm-builder", "litert-lm-api"}
    assert manifest["metrics"]["weight_ratio"] > 1.9
    assert (artifact / "model.tflite").stat().st_size == manifest["metrics"]["file_bytes"]


def test_everything_in_the_store_has_the_permissions_the_umask_gives(golden):
    """Versions, manifests, pointers and reports as a user's own files would be (0755 and 0644 under the usual
    umask 022), so that a web server or another account can read what was published."""
    umask = os.umask(0)
    os.umask(umask)
    store = Path(golden.pipeline.store.path)
    modes = {p.relative_to(store).as_posix(): p.stat().st_mode & 0o777 for p in store.rglob("*")}
    assert {f"{DEMO_MODEL}/champion.json", f"{DEMO_MODEL}/report.parquet", "report.png"} <= set(modes)
    assert {p for p in modes if p.endswith("/manifest.json")}, "nothing was published"
    assert modes == {p: (0o777 if (store / p).is_dir() else 0o666) & ~umask for p in modes}


def test_report_lists_every_recipe(golden, golden_instance):
    meta = metadata(golden_instance, "quantization_report", DEMO_MODEL)
    report = pd.read_parquet(meta["parquet"])
    assert list(report["recipe"]) == golden.recipes
    assert set(report["status"]) == {"published"}
    assert "| dynamic_int8 " in meta["report"]


def test_republishing_the_same_inputs_is_a_no_op(demo_sandbox):
    from edge_quant_pipeline.definitions import build_definitions

    instance = demo_sandbox.instance
    before = metadata(instance, "published_artifact", key("fp16"))
    result = (
        build_definitions(demo_sandbox.pipeline)
        .resolve_job_def("quantize_evaluate_publish")
        .execute_in_process(
            partition_key=dg.MultiPartitionKey({"model": DEMO_MODEL, "recipe": "fp16"}), instance=instance
        )
    )
    after = metadata(instance, "published_artifact", key("fp16"))
    assert result.success
    assert after["version"] == before["version"] and after["newly_published"] is False
    # the manifest says what the UI says (to the digits the UI shows): the latest evaluation's, latency included
    manifest = json.loads((Path(after["artifact_path"]) / "manifest.json").read_text())
    shown = for_ui(manifest["metrics"])
    for name in ("decode_tokens_per_s", "prefill_ms", "perplexity_ratio"):
        assert shown[name] == after[name]


def test_every_quantized_model_passed_its_blocking_conformance_check(golden, golden_instance):
    check = dg.AssetCheckKey(dg.AssetKey("quantized_tflite"), "matches_recipe")
    history = golden_instance.event_log_storage.get_asset_check_execution_history(check, limit=100)
    assert len(history) == len(golden.recipes)
    assert {record.status.value for record in history} == {"SUCCEEDED"}
    weights = metadata(golden_instance, "quantized_tflite", key("selective_fp16_int8"))["weights_by_component"]
    assert "| embedding" in weights


def test_lm_metrics_respond_to_quantization(golden_instance):
    instance = golden_instance
    float_eval = metadata(instance, "evaluation", key("float"))
    int8 = metadata(instance, "evaluation", key("dynamic_int8"))
    int4 = metadata(instance, "evaluation", key("dynamic_int4_block128"))
    assert float_eval["generation_agreement"] == 1.0 and float_eval["max_kl"] < 1e-4
    assert float_eval["logits_sqnr_db"] > 60
    assert int8["logits_sqnr_db"] > int4["logits_sqnr_db"] > 5
    assert int8["generation_agreement"] >= int4["generation_agreement"]
    assert int4["p99_kl"] > int4["mean_kl"] and int4["max_kl"] >= int4["p99_kl"]
    assert int4["delta_p_correct"] < 0  # quantization makes the true next token less likely
    assert 10 < int8["peak_rss_mb"] < 500 and int8["decode_tokens_per_s"] > 0


def test_error_hotspots_name_layers(golden_instance):
    instance = golden_instance
    hotspots = metadata(instance, "evaluation", key("dynamic_int4_block32"))["error_hotspots"]
    assert "SNR dB" in hotspots and ("feedforward" in hotspots or "attention" in hotspots)


def test_damaged_weights_fail_the_gate_and_are_not_published(demo_sandbox):
    """A quantized model whose weights were damaged after quantization is caught by its
    quality gate: the blocking check fails, nothing is published, the report says why."""
    from edge_quant_pipeline.atomic import write_atomically
    from edge_quant_pipeline.definitions import build_definitions
    from edge_quant_pipeline.publish.store import FAILURE_RECORD

    instance, pipeline = demo_sandbox.instance, demo_sandbox.pipeline
    partition = dg.MultiPartitionKey({"model": DEMO_MODEL, "recipe": "weight_only_int8"})
    quantized = Path(metadata(instance, "quantized_tflite", str(partition))["tflite"])
    published_before = metadata(instance, "published_artifact", str(partition))
    original = quantized.read_bytes()
    # A new file, as the pipeline writes every work file: the published version is a hard link of the old one.
    write_atomically(quantized, scramble_weights(quantized, "feedforward"))
    job = build_definitions(pipeline).resolve_job_def("quantize_evaluate_publish")
    selection = [dg.AssetKey("evaluation"), dg.AssetKey("published_artifact")]
    result = job.execute_in_process(
        partition_key=partition, instance=instance, raise_on_error=False, asset_selection=selection
    )
    (gate,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "quality_gates"]
    assert not gate.passed
    assert metadata(instance, "published_artifact", str(partition)) == published_before  # nothing new published
    failure = pipeline.store / DEMO_MODEL / "weight_only_int8" / FAILURE_RECORD
    record = json.loads(failure.read_text())
    assert record["stage"] == "quality gate" and "perplexity_ratio" in record["error"]
    # The file as it was passes again, and the failure record goes.
    write_atomically(quantized, original)
    assert job.execute_in_process(partition_key=partition, instance=instance, asset_selection=selection).success
    assert not failure.exists()


def test_nightly_schedules_request_nothing_after_a_full_run(golden, golden_instance):
    """Every (model, recipe) published for its current inputs: no schedule requests anything."""
    from edge_quant_pipeline.definitions import build_definitions
    from edge_quant_pipeline.defs.automation import nightly_schedules

    repository = build_definitions(golden.pipeline).get_repository_def()
    for schedule in nightly_schedules("0 2 * * *", "UTC", rebuild_all=False):
        with dg.build_schedule_context(
            instance=golden_instance, resources={"pipeline": golden.pipeline}, repository_def=repository
        ) as context:
            assert schedule.evaluate_tick(context).run_requests == [], schedule.name
