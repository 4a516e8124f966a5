"""The artifact store on an S3 API: moto's standalone server, started here on loopback, through s3fs, as
EDGE_QUANT_ARTIFACT_DIR=s3://... reaches it. An object store has no rename and no lock: a publish killed half way
leaves no version, concurrent publishers never share a number, and a reader never sees half a version."""

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, S3_BUCKET

from edge_quant_pipeline.config import ArtifactStore, PipelineConfig
from edge_quant_pipeline.publish.retention import prune_versions
from edge_quant_pipeline.publish.store import MANIFEST, MODEL_FILE, NUMBERS, ArtifactInputs, latest_pointer, publish
from edge_quant_pipeline.publish.store import published_versions as versions_of

pytestmark = pytest.mark.services


@pytest.fixture
def store_url(s3_endpoint) -> str:
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}"


def inputs(checkpoint: str) -> ArtifactInputs:
    return ArtifactInputs("model", "int8", checkpoint, "r1", {})


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_versions_on_s3_are_whole_numbered_and_published_once(store_url, tmp_path):
    store = ArtifactStore(url=store_url).root
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(os.urandom(100_000))
    published = [publish(store, inputs(c), tflite, {"file_bytes": 1}, {}) for c in ("a", "b", "c")]
    again = publish(store, inputs("b"), tflite, {"file_bytes": 2}, {})
    assert [a.manifest["number"] for a in published] == [1, 2, 3]
    assert [a.manifest["previous_version"] for a in published] == [None, published[0].version, published[1].version]
    assert not again.newly_published and again.manifest["number"] == 2 and again.manifest["metrics"]["file_bytes"] == 2
    assert [m["number"] for m in versions_of(store, "model", "int8")] == [1, 2, 3]
    assert sha256(published[2].model_file) == sha256(tflite) == published[2].manifest["model_sha256"]
    assert latest_pointer(store, "model", "int8")["version"] == published[1].version  # "b" was published last
    assert sorted(p.name for p in (store / "model" / "int8" / NUMBERS).iterdir()) == ["1.json", "2.json", "3.json"]


def test_retention_on_s3_removes_old_versions_manifest_and_files(store_url, tmp_path):
    store = ArtifactStore(url=store_url).root
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(os.urandom(100_000))
    published = [publish(store, inputs(c), tflite, {"file_bytes": 1}, {}) for c in ("a", "b", "c")]
    removed = prune_versions(store, "model", "int8", keep=1)
    assert [v.number for v in removed] == [1, 2] and all(v.bytes > 100_000 for v in removed)
    assert [m["number"] for m in versions_of(store, "model", "int8")] == [3]
    assert not store.fs.exists((published[0].path / MODEL_FILE).path)
    assert latest_pointer(store, "model", "int8")["version"] == published[2].version


PUBLISH = """
import sys, time
from pathlib import Path
from upath import UPath
from edge_quant_pipeline.config import ArtifactStore
from edge_quant_pipeline.publish.store import ArtifactInputs, publish
url, tflite, checkpoint, start = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
Path(f"{start}.ready-{sys.argv[5]}").touch()
while not start.exists():
    time.sleep(0.001)
store = ArtifactStore(url=url).root
publish(store, ArtifactInputs("model", "int8", checkpoint, "r1", {}), tflite, {"file_bytes": 1}, {})
"""


def start_publishers(tmp_path: Path, url: str, tflite: Path, checkpoints: list[str]) -> list[subprocess.Popen]:
    """Processes that publish ``checkpoints`` into one (model, recipe), all let go at the same moment."""
    start = tmp_path / "start"
    args = [sys.executable, "-c", PUBLISH, url, str(tflite)]
    processes = [subprocess.Popen([*args, c, str(start), str(i)], cwd=REPO) for i, c in enumerate(checkpoints)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("start.ready-*"))) < len(processes):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.01)
    start.touch()
    return processes


def test_a_publish_killed_mid_upload_leaves_no_version_on_s3(store_url, tmp_path):
    """SIGKILL while a 150 MB model uploads (after the publisher claimed its number): no version, no pointer; the
    next publish of the same inputs takes the claim back and publishes number 1, whole."""
    big = tmp_path / "big.tflite"
    with big.open("wb") as f:
        f.truncate(150 * 1024 * 1024)
    store = ArtifactStore(url=store_url).root
    claim = store / "model" / "int8" / NUMBERS / "1.json"
    (process,) = start_publishers(tmp_path, store_url, big, ["c1"])
    deadline = time.monotonic() + 60
    while not claim.exists():
        assert process.poll() is None, "the publish finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.5)  # into the upload
    assert process.poll() is None, "the publish finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    version = store / "model" / "int8" / inputs("c1").version
    assert not (version / MANIFEST).exists() and versions_of(store, "model", "int8") == []
    assert latest_pointer(store, "model", "int8") is None

    artifact = publish(store, inputs("c1"), big, {"file_bytes": big.stat().st_size}, {})
    assert artifact.newly_published and artifact.manifest["number"] == 1
    assert artifact.model_file.stat().st_size == big.stat().st_size


def test_concurrent_publishers_on_s3_never_share_a_number(store_url, tmp_path):
    """Five processes at the same moment, four different versions (one of them twice): each version once, the
    numbers 1 to 4 each taken once, every manifest naming its own file's hash."""
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(os.urandom(4 << 20))
    processes = start_publishers(tmp_path, store_url, tflite, ["c0", "c0", "c1", "c2", "c3"])
    assert [p.wait(timeout=120) for p in processes] == [0] * len(processes)
    store = ArtifactStore(url=store_url).root
    versions = versions_of(store, "model", "int8")
    assert [m["number"] for m in versions] == [1, 2, 3, 4]
    assert sorted(m["checkpoint_sha256"] for m in versions) == ["c0", "c1", "c2", "c3"]
    for manifest in versions:
        model = store / "model" / "int8" / manifest["version"] / MODEL_FILE
        assert manifest["model_sha256"] == sha256(model) == sha256(tflite)
    latest = latest_pointer(store, "model", "int8")
    assert latest["version"] in {m["version"] for m in versions}


def test_a_reader_during_publishes_on_s3_sees_only_whole_versions(store_url, tmp_path):
    """While three versions are published one after another, a reader lists the store as fast as it can: every
    version it sees has its manifest and a model file whose hash is the manifest's."""
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(os.urandom(16 << 20))
    expected = sha256(tflite)
    processes = start_publishers(tmp_path, store_url, tflite, ["r1", "r2", "r3"])
    store = ArtifactStore(url=store_url).root
    seen: set[str] = set()
    while any(p.poll() is None for p in processes) or len(seen) < 3:
        for manifest in versions_of(store, "model", "int8"):
            model = store / "model" / "int8" / manifest["version"] / MODEL_FILE
            assert manifest["model_sha256"] == expected == sha256(model)
            seen.add(manifest["version"])
        assert all(p.poll() in (None, 0) for p in processes)
    assert len(seen) == 3


def test_the_demo_graph_publishes_to_s3(store_url, demo_sandbox):
    """The graph, as `edge-quant run` launches it (worker processes), with its artifact store on S3: versions,
    pointers, the champion and the reports land there, and a second run finds everything published. On a copy of
    the golden build, so the export is done: the store's part (publishing, reports) runs, for `float` and one
    quantized recipe, which is all publishing needs to show."""
    from conftest import DEMO_MODEL

    from edge_quant_pipeline.publish.report import read_parquet
    from edge_quant_pipeline.runs.launch import materialize

    instance = demo_sandbox.instance
    pipeline = PipelineConfig(**{**demo_sandbox.pipeline.model_dump(), "artifact_store": ArtifactStore(url=store_url)})
    recipes = ["float", "dynamic_int8"]
    summary = materialize(instance, pipeline, [DEMO_MODEL], recipes, jobs=2)
    assert summary.failures == 0
    assert {o.run.job for o in summary.outcomes} == {"quantize_evaluate_publish", "report", "report_all_models"}
    store = pipeline.store
    report = read_parquet(store / DEMO_MODEL / "report.parquet")
    published = report[report["recipe"].isin(recipes)]
    assert set(published["status"]) == {"published"}
    for recipe in recipes:
        (manifest,) = versions_of(store, DEMO_MODEL, recipe)
        model = store / DEMO_MODEL / recipe / manifest["version"] / MODEL_FILE
        assert manifest["model_sha256"] == sha256(model)
        assert latest_pointer(store, DEMO_MODEL, recipe)["version"] == manifest["version"]
    assert (store / DEMO_MODEL / "champion.json").exists() and (store / "report.parquet").exists()
    again = materialize(instance, pipeline, [DEMO_MODEL], recipes, jobs=2)
    assert again.outcomes == [] and again.failures == 0
