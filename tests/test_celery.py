"""The demo graph on Dagster's Celery executor: two Celery workers, each with a work folder of its own, sharing
nothing but PostgreSQL (the instance), Redis (the broker) and an S3 API (moto's server: the work store, where step
outputs and intermediates cross, and the artifact store). Both workers run steps, steps hand files to steps on the
other worker through the store, and what is published equals the golden build's, made in one process on local
disk: the same artifact versions, bytes and quality metrics (speed and memory differ from run to run; they are not
compared)."""

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from conftest import DEMO_MODEL, S3_BUCKET
from servers import redis_server

from edge_quant_pipeline.publish.store import BUNDLE_FILE, published_versions

pytestmark = pytest.mark.services
# The float file and a calibrated recipe, whose step reads the calibration statistics another step made: every
# kind of intermediate crosses between workers (another quantized recipe would only repeat the float one's steps).
RECIPES = ["float", "static_int8_a16"]
# The golden build's static_int8_a16 (tests/demo_build.py), so that the versions are the same.
RECIPES_YAML = """
recipes:
  static_int8_a16:
    default: int8_static_a16
    embedding: int8_dynamic
"""
WORKERS = ("north", "south")
# Measured quality: the same inputs must give the same numbers on any worker.
QUALITY = (
    "file_bytes",
    "weight_bytes",
    "perplexity",
    "mean_kl",
    "p99_kl",
    "max_kl",
    "top1_agreement",
    "logits_sqnr_db",
    "generation_agreement",
    "litert_lm_interpreter_agreement",
)
# Compute logs would go to the launching machine's DAGSTER_HOME, a disk the workers must not share.
NO_COMPUTE_LOGS = """
compute_logs:
  module: dagster._core.storage.noop_compute_log_manager
  class: NoOpComputeLogManager
"""


def settings_env(tmp_path: Path, broker: str) -> dict[str, str]:
    """What every process of the deployment is given (each worker adds its own work folder)."""
    prefix = f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"
    (tmp_path / "recipes.yaml").write_text(RECIPES_YAML)
    return {
        "EDGE_QUANT_EXECUTOR": "celery",
        "EDGE_QUANT_CELERY_BROKER": broker,
        "EDGE_QUANT_WORK_STORE": f"{prefix}/work",
        "EDGE_QUANT_ARTIFACT_DIR": f"{prefix}/artifacts",
        "EDGE_QUANT_RECIPES": str(tmp_path / "recipes.yaml"),
    }


def start_worker(name: str, folder: Path, env: dict[str, str]) -> subprocess.Popen:
    folder.mkdir()
    worker_env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}  # steps open the run's instance
    worker_env |= {**env, "EDGE_QUANT_WORK_DIR": str(folder / "work")}
    command = [sys.executable, "-m", "celery", "-A", "edge_quant_pipeline.celery_app", "worker", "-Q", "dagster"]
    command += ["-n", f"{name}@%h", "--concurrency", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    with (folder / "worker.log").open("w") as log:
        return subprocess.Popen(command, cwd=folder, env=worker_env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_workers(broker: str, workers: list[subprocess.Popen]) -> None:
    from celery import Celery

    app = Celery(broker=broker, backend=broker)
    deadline = time.monotonic() + 120
    while len(app.control.ping(timeout=1)) < len(workers):
        assert all(w.poll() is None for w in workers), "a Celery worker exited; see its worker.log"
        assert time.monotonic() < deadline, "the Celery workers did not answer within 2 minutes"


def step_workers(instance: dg.DagsterInstance) -> dict[tuple[str, str], str]:
    """(run id, step) -> the Celery worker that executed it, from the engine events the workers log."""
    executed = {}
    for run in instance.get_runs():
        for record in instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
            entry = record.event_log_entry
            worker = entry.dagster_event.engine_event_data.metadata.get("Celery worker")
            if worker is not None:
                executed[(run.run_id, entry.step_key)] = worker.value.split("@")[0]
    return executed


def bundle_sections(bundle: bytes) -> list[str]:
    """The sha256 of each section a LiteRT-LM bundle packs (model, tokenizer, metadata): its content, without the
    header, where litert-lm-builder writes a new uuid and creation time into every bundle it builds."""
    from litert_lm_builder import litertlm_core
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    header_end = int.from_bytes(bundle[litertlm_core.HEADER_END_LOCATION_BYTE_OFFSET :][:8], "little")
    header = schema.LiteRTLMMetaData.GetRootAs(bundle[litertlm_core.HEADER_BEGIN_BYTE_OFFSET : header_end], 0)
    sections = header.SectionMetadata()
    return [
        hashlib.sha256(bundle[s.BeginOffset() : s.EndOffset()]).hexdigest()
        for s in map(sections.Objects, range(sections.ObjectsLength()))
    ]


def published(store, recipe: str) -> dict:
    (manifest,) = published_versions(store, DEMO_MODEL, recipe)
    return manifest


@pytest.fixture
def broker(tmp_path):
    with redis_server(tmp_path) as url:
        yield url


def test_the_demo_graph_on_two_celery_workers_equals_a_single_process_run(
    dagster_home, s3_endpoint, broker, tmp_path, monkeypatch, golden
):
    # About 3 minutes on 2 cores, beside another test worker: every one of the 16 steps is a fresh process on a
    # Celery worker (one task per child) that imports Dagster and the code location, and torch for the
    # conversion's steps. That is what a distributed run costs; two recipes are the fewest that send every kind of
    # intermediate across workers.
    from edge_quant_pipeline.config import pipeline_config_from_env
    from edge_quant_pipeline.runs.launch import materialize

    with (dagster_home / "dagster.yaml").open("a") as profile:
        profile.write(NO_COMPUTE_LOGS)
    env = settings_env(tmp_path, broker)
    workers = [start_worker(name, tmp_path / name, env) for name in WORKERS]
    try:
        wait_for_workers(broker, workers)
        for key, value in {**env, "EDGE_QUANT_WORK_DIR": str(tmp_path / "launcher" / "work")}.items():
            monkeypatch.setenv(key, value)
        distributed = pipeline_config_from_env()
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            summary = materialize(instance, distributed, [DEMO_MODEL], RECIPES, jobs=2)
            executed = step_workers(instance)
            steps = sum(
                len(instance.get_records_for_run(r.run_id, of_type=dg.DagsterEventType.STEP_START).records)
                for r in instance.get_runs()
            )
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(60)
    assert summary.failures == 0

    # Every step ran on a worker, and both workers ran steps.
    assert len(executed) == steps > 10
    assert sorted(set(executed.values())) == sorted(WORKERS)
    # Nothing was made where the runs were launched; the float .tflite, made on one worker, was read on the other
    # too (calibration and each pair's steps read it): downloaded from the work store into that worker's own folder.
    assert not list((tmp_path / "launcher").rglob("*.tflite"))
    assert all(list((tmp_path / name / "work").rglob("float.tflite")) for name in WORKERS)

    # The golden build: the same graph in one process, on local disk, with the default executor.
    for recipe in RECIPES:
        remote_manifest, local_manifest = published(distributed.store, recipe), published(golden.pipeline.store, recipe)
        assert remote_manifest["version"] == local_manifest["version"]
        assert remote_manifest["model_sha256"] == local_manifest["model_sha256"]
        remote_bundle, local_bundle = (
            (store / DEMO_MODEL / recipe / manifest["version"] / BUNDLE_FILE).read_bytes()
            for store, manifest in ((distributed.store, remote_manifest), (golden.pipeline.store, local_manifest))
        )
        assert bundle_sections(remote_bundle) == bundle_sections(local_bundle)
        for metric in QUALITY:
            assert remote_manifest["metrics"][metric] == pytest.approx(local_manifest["metrics"][metric]), metric
