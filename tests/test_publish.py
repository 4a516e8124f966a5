"""The artifact store on a local folder and on fsspec's in-memory filesystem (standing in
for an object store): atomic and idempotent publishing, version numbers, pointers, diffs."""

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest
from conftest import REPO
from upath import UPath

from edge_quant_pipeline.atomic import link_or_copy, locked_scratch_beside
from edge_quant_pipeline.config import ArtifactStore
from edge_quant_pipeline.publish.retention import prune_store, prune_versions
from edge_quant_pipeline.publish.store import (
    LOCK,
    MANIFEST,
    MODEL_FILE,
    STAGING,
    ArtifactInputs,
    latest_outcome,
    latest_pointer,
    point_champion,
    publish,
    published_manifest,
    published_versions,
    record_failure,
)

METRICS = {
    "file_bytes": 1000,
    "perplexity_ratio": 1.01,
    "mean_kl": 0.01,
    "top1_agreement": 0.95,
    "decode_tokens_per_s": 3000.0,
}


def inputs(checkpoint_hash: str = "c1", recipe: str = "int8") -> ArtifactInputs:
    return ArtifactInputs("model", recipe, checkpoint_hash, "r1", {"litert-torch": "0.10.0"})


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> UPath:
    url = str(tmp_path / "store") if request.param == "local" else f"memory://edge-quant-{uuid.uuid4().hex}"
    return ArtifactStore(url=url).root


@pytest.fixture
def tflite(tmp_path) -> Path:
    path = tmp_path / "model.tflite"
    path.write_bytes(os.urandom(1000))
    return path


def test_store_url_picks_the_filesystem(tmp_path, monkeypatch):
    from edge_quant_pipeline.config import artifact_store_from_env

    assert ArtifactStore(url=str(tmp_path)).root.protocol == ""
    assert ArtifactStore(url="memory://bucket/prefix").root.protocol == "memory"
    monkeypatch.setenv("EDGE_QUANT_ARTIFACT_DIR", "memory://from-env")
    with dg.build_resources({"store": artifact_store_from_env()}) as resources:  # as a run resolves it
        assert str(resources.store.root) == "memory://from-env"
    monkeypatch.delenv("EDGE_QUANT_ARTIFACT_DIR")
    assert artifact_store_from_env().root == UPath("artifacts").absolute()


def test_publishing_the_same_inputs_twice_makes_one_version_with_the_latest_metrics(store, tflite):
    first = publish(store, inputs(), tflite, METRICS, {})
    second = publish(store, inputs(), tflite, {**METRICS, "decode_tokens_per_s": 2900.0}, {})
    assert first.newly_published and not second.newly_published
    assert second.manifest["metrics"]["decode_tokens_per_s"] == 2900.0
    assert published_manifest(store, inputs()) == second.manifest
    unchanged = ("version", "number", "published_at", "model_sha256")
    assert {k: second.manifest[k] for k in unchanged} == {k: first.manifest[k] for k in unchanged}
    assert first.model_file.read_bytes() == tflite.read_bytes()
    assert [m["version"] for m in published_versions(store, "model", "int8")] == [first.version]


@pytest.mark.parametrize(
    "change",
    [
        {"checkpoint_hash": "c2"},
        {"recipe_hash": "r2"},
        {"toolchain": {"litert-torch": "0.11.0"}},
        {"exporter": "export_hf"},
        {"tokenizer_hash": "t2"},
        {"export": {"prefill_len": 64, "kv_cache_len": 128}},
        {"evaluation": {"eval_text_sha256": "e2", "eval_max_tokens": 2048}},
        {"gates": {"max_perplexity_ratio": 1.05}},
    ],
)
def test_every_input_makes_its_own_version_and_is_recorded_in_the_manifest(store, tflite, change):
    base = replace(
        inputs(),
        tokenizer_hash="t1",
        export={"prefill_len": 32, "kv_cache_len": 128},
        evaluation={"eval_text_sha256": "e1", "eval_max_tokens": 2048},
        gates={"max_perplexity_ratio": 1.1},
    )
    changed = replace(base, **change)
    assert changed.version != base.version
    manifest = publish(store, changed, tflite, METRICS, {}).manifest
    assert {k: manifest[k] for k in changed.identity()} == changed.identity()


def test_versions_are_numbered_per_model_and_recipe_and_latest_follows(store, tflite):
    numbers = [publish(store, inputs(checkpoint), tflite, METRICS, {}).manifest["number"] for checkpoint in "abc"]
    other_recipe = publish(store, inputs("a", recipe="fp16"), tflite, METRICS, {})
    assert numbers == [1, 2, 3] and other_recipe.manifest["number"] == 1
    latest = latest_pointer(store, "model", "int8")
    assert (latest["version"], latest["number"]) == (inputs("c").version, 3)
    publish(store, inputs("a"), tflite, METRICS, {})  # inputs went back to "a": it is current again
    assert latest_pointer(store, "model", "int8")["version"] == inputs("a").version


def test_a_new_version_records_its_difference_from_the_previous_one(store, tflite):
    first = publish(store, inputs("a"), tflite, METRICS, {})
    assert first.manifest["previous_version"] is None and first.manifest["delta"] == {}
    better = {**METRICS, "file_bytes": 800, "perplexity_ratio": 1.02, "decode_tokens_per_s": 3100.0}
    second = publish(store, inputs("b"), tflite, better, {})
    assert second.manifest["previous_version"] == first.version
    assert second.manifest["delta"] == pytest.approx(
        {
            "file_bytes": -200,
            "perplexity_ratio": 0.01,
            "mean_kl": 0.0,
            "top1_agreement": 0.0,
            "decode_tokens_per_s": 100.0,
        }
    )


def test_a_version_without_its_manifest_does_not_exist(tflite):
    """What an object store holds after a publish died between the model file and the manifest."""
    store = ArtifactStore(url=f"memory://edge-quant-{uuid.uuid4().hex}").root
    (store / "model" / "int8" / inputs().version / MODEL_FILE).write_bytes(b"half a model")
    assert published_manifest(store, inputs()) is None and published_versions(store, "model", "int8") == []
    artifact = publish(store, inputs(), tflite, METRICS, {})
    assert artifact.newly_published and artifact.model_file.read_bytes() == tflite.read_bytes()


def test_a_failure_after_publishing_withdraws_the_version_until_it_passes_again(store, tflite):
    """The latest evaluation decides: a failure recorded for a published version outranks its manifest and takes
    latest.json away (the version stays); publishing the same inputs again brings both back."""
    published = publish(store, inputs(), tflite, METRICS, {})
    record_failure(store, inputs(), "quality gate", "perplexity_ratio = 1.2 (fails max_perplexity_ratio 1.1)")
    manifest, failure = latest_outcome(store, inputs())
    assert manifest is None and failure["stage"] == "quality gate"
    assert latest_pointer(store, "model", "int8") is None
    assert published_manifest(store, inputs()) == published.manifest

    again = publish(store, inputs(), tflite, METRICS, {})
    assert not again.newly_published and latest_outcome(store, inputs()) == (again.manifest, None)
    assert latest_pointer(store, "model", "int8")["version"] == published.version


def test_champion_pointer_moves_only_when_the_champion_changes(store):
    first = point_champion(store, "model", {"recipe": "int8", "version": "v-1"})
    again = point_champion(store, "model", {"recipe": "int8", "version": "v-1"})
    moved = point_champion(store, "model", {"recipe": "int4", "version": "v-2"})
    assert first.changed and first.previous is None
    assert not again.changed
    assert moved.changed and moved.previous["recipe"] == "int8"
    assert (store / "model" / "champion.json").read_text().count('"int4"') == 1
    gone = point_champion(store, "model", None)  # no recipe of the current checkpoint is published
    assert gone.changed and gone.previous["recipe"] == "int4" and not (store / "model" / "champion.json").exists()
    assert not point_champion(store, "model", None).changed


def test_published_files_have_the_permissions_the_umask_gives(tmp_path, tflite):
    """Not mkstemp's and mkdtemp's private 0600 and 0700: a web server or another account reads the store. (The
    model file is a hard link of the work folder's, which the pipeline writes under the same umask.)"""
    store = ArtifactStore(url=str(tmp_path / "store")).root
    previous = os.umask(0o027)
    try:
        work_file = tmp_path / "work.tflite"
        work_file.write_bytes(tflite.read_bytes())
        publish(store, inputs("c1"), work_file, METRICS, {})
        record_failure(store, inputs(recipe="fp16"), "evaluation", "quality gate")
        point_champion(store, "model", {"recipe": "int8", "version": inputs("c1").version})
    finally:
        os.umask(previous)
    folders = [p for p in Path(store.path).rglob("*") if p.is_dir()]
    files = [p for p in Path(store.path).rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.tflite", "manifest.json", "latest.json", "failed.json", "champion.json"}
    assert {p.relative_to(store.path).as_posix(): oct(p.stat().st_mode & 0o777) for p in folders} == {
        f: "0o750" for f in ("model", "model/int8", "model/fp16", f"model/int8/{inputs('c1').version}")
    }
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}


KILLED_PUBLISH = """
import sys
from pathlib import Path
from upath import UPath
from edge_quant_pipeline.publish.store import ArtifactInputs, publish
store, tflite = UPath(sys.argv[1]), Path(sys.argv[2])
publish(store, ArtifactInputs("model", "int8", "c1", "r1", {}), tflite, {"file_bytes": tflite.stat().st_size}, {})
"""


def test_a_publish_killed_while_copying_leaves_no_version(tmp_path, elsewhere):
    """A real SIGKILL in the middle of copying a 200 MB model (from another filesystem: from the store's own it is
    linked): nothing becomes visible, and the next publish of the same inputs succeeds."""
    big = elsewhere / "big.tflite"
    with big.open("wb") as f:  # sparse: 200 MB without writing them
        f.truncate(200 * 1024 * 1024)
    store = tmp_path / "store"
    recipe_dir = store / "model" / "int8"
    process = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISH, str(store), str(big)], cwd=REPO)
    deadline = time.monotonic() + 60
    while not any(recipe_dir.glob(".v-*.tmp-*/" + MODEL_FILE)):
        assert process.poll() is None, "the publish finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    (staging,) = recipe_dir.glob(".v-*.tmp-*")
    assert (staging / MODEL_FILE).stat().st_size < big.stat().st_size  # killed mid-copy
    assert published_versions(UPath(store), "model", "int8") == []
    assert sorted(p.name for p in recipe_dir.iterdir()) == sorted([staging.name, LOCK])  # no version, no pointer

    artifact = publish(UPath(store), inputs(), big, {"file_bytes": big.stat().st_size}, {})
    assert artifact.newly_published and artifact.manifest["number"] == 1
    assert artifact.model_file.stat().st_size == big.stat().st_size
    assert list(recipe_dir.glob(STAGING)) == []  # the dead publisher's staging folder went with it


RACING_PUBLISH = """
import sys, time
from pathlib import Path
from upath import UPath
from edge_quant_pipeline.publish.store import ArtifactInputs, publish
store, tflite, start, checkpoint = UPath(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
Path(f"{start}.ready-{checkpoint}-{sys.argv[5]}").touch()
while not start.exists():
    time.sleep(0.001)
publish(store, ArtifactInputs("model", "int8", checkpoint, "r1", {}), tflite, {"file_bytes": 1}, {})
"""


def test_concurrent_publishes_are_serialized(tmp_path):
    """Five processes publish into one (model, recipe) at the same moment: four different versions, one of
    them twice. Unserialized, each would find no version yet and number itself 1."""
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(os.urandom(8 << 20))  # long enough to copy that the publishes overlap
    store, start = tmp_path / "store", tmp_path / "start"
    checkpoints = ["c0", "c0", "c1", "c2", "c3"]
    args = [sys.executable, "-c", RACING_PUBLISH, str(store), str(tflite), str(start)]
    processes = [subprocess.Popen([*args, c, str(i)], cwd=REPO) for i, c in enumerate(checkpoints)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("start.ready-*"))) < len(processes):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.01)
    start.touch()
    assert [p.wait(timeout=60) for p in processes] == [0] * len(processes)

    versions = published_versions(UPath(store), "model", "int8")
    assert [m["number"] for m in versions] == [1, 2, 3, 4]
    assert sorted(m["checkpoint_sha256"] for m in versions) == ["c0", "c1", "c2", "c3"]
    assert [m["previous_version"] for m in versions] == [None] + [m["version"] for m in versions[:-1]]
    expected_sha = hashlib.sha256(tflite.read_bytes()).hexdigest()
    for manifest in versions:
        model = store / "model" / "int8" / manifest["version"] / MODEL_FILE
        assert manifest["model_sha256"] == expected_sha == hashlib.sha256(model.read_bytes()).hexdigest()
    # latest.json names whichever publish took the lock last (a republish of c0 re-points it), and whole
    latest = latest_pointer(UPath(store), "model", "int8")
    assert any(latest == {k: m[k] for k in ("version", "number", "artifact_path", "published_at")} for m in versions)
    assert list((store / "model" / "int8").glob(STAGING)) == []


def test_linking_a_file_to_where_it_already_is_leaves_no_hidden_copy(tmp_path):
    """The float recipe's file is a hard link of the float export: made again for new inputs, it must not leave
    a hidden link behind each time (renaming one link of a file over another is a no-op that keeps both)."""
    source = tmp_path / "float.tflite"
    source.write_bytes(os.urandom(1000))
    for _ in range(2):
        link_or_copy(source, tmp_path / "float-recipe.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float-recipe.tflite", "float.tflite"]
    assert (tmp_path / "float-recipe.tflite").samefile(source)


def test_two_writers_of_one_file_get_scratch_folders_of_their_own_and_a_killed_writers_is_removed(tmp_path):
    """Two runs converting one checkpoint at once each make, run and remove the float bundle: each in a folder of its
    own, which the other's start does not remove (a shared path was removed under the other's runtime); a folder
    whose writer was killed (its lock free) is removed by the next writer."""
    bundle = tmp_path / "float.litertlm"
    killed = tmp_path / ".float.litertlm.tmp-killed"
    killed.mkdir()
    (killed / ".lock").touch()
    with locked_scratch_beside(bundle) as first:
        assert not killed.exists()
        (first / bundle.name).write_bytes(b"first")
        with locked_scratch_beside(bundle) as second:
            assert second != first and (first / bundle.name).read_bytes() == b"first"
    assert list(tmp_path.iterdir()) == []


def test_the_model_card_copies_only_what_the_checkpoint_declares(tmp_path):
    """A license from the checkpoint's own card, a hub repository from config.json's ``_name_or_path`` when it is
    one (org/name); a local path or a card without metadata gives nothing."""
    from edge_quant_pipeline.publish.card import checkpoint_card_facts

    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [llm]\n---\n# A model\n")
    assert checkpoint_card_facts(tmp_path, {"_name_or_path": "Qwen/Qwen3-4B"}) == {
        "license": "apache-2.0",
        "base_model": "Qwen/Qwen3-4B",
    }
    (tmp_path / "README.md").write_text("# No metadata\n")
    assert checkpoint_card_facts(tmp_path, {"_name_or_path": "/home/me/checkpoints/qwen"}) == {}
    (tmp_path.parent / "out" / "model").mkdir(parents=True)  # saved from a local folder, not a hub repository
    assert checkpoint_card_facts(tmp_path, {"_name_or_path": "out/model"}) == {}


def test_retention_keeps_the_newest_versions_and_every_version_a_pointer_names(store, tflite):
    published = [publish(store, inputs(c), tflite, METRICS, {}) for c in ("c1", "c2", "c3", "c4", "c5")]
    publish(store, inputs("c2"), tflite, METRICS, {})  # latest.json: version 2, evaluated again and passing
    point_champion(store, "model", {"recipe": "int8", "version": published[0].version})
    other = publish(store, inputs("c1", recipe="fp16"), tflite, METRICS, {})
    assert [v.number for v in prune_versions(store, "model", "int8", keep=2, dry_run=True)] == [3]
    assert len(published_versions(store, "model", "int8")) == 5  # a dry run removes nothing

    removed = prune_store(store, keep=2)
    assert [(v.recipe, v.number) for v in removed] == [("int8", 3)] and removed[0].bytes > len(tflite.read_bytes())
    assert [m["number"] for m in published_versions(store, "model", "int8")] == [1, 2, 4, 5]
    assert not (store / "model" / "int8" / published[2].version).exists()
    assert published_manifest(store, inputs("c1", recipe="fp16")) == other.manifest
    assert prune_versions(store, "model", "int8", keep=0) == [] and prune_store(store, keep=2) == []


def test_a_version_whose_removal_was_killed_is_gone_for_readers_and_removed_next_time(tmp_path, tflite):
    store = ArtifactStore(url=str(tmp_path / "store")).root
    published = [publish(store, inputs(c), tflite, METRICS, {}) for c in ("c1", "c2")]
    (published[0].path / MANIFEST).unlink()  # where a removal killed half way stops
    assert [m["number"] for m in published_versions(store, "model", "int8")] == [2]
    assert [(v.version, v.number) for v in prune_versions(store, "model", "int8", keep=1)] == [
        (published[0].version, None)
    ]
    assert not published[0].path.exists() and published_manifest(store, inputs("c2")) == published[1].manifest


def test_edge_quant_prune_lists_then_removes_what_retention_does_not_keep(tmp_path, tflite, monkeypatch, capsys):
    from edge_quant_pipeline.cli import main

    store = ArtifactStore(url=str(tmp_path / "store")).root
    for checkpoint in ("c1", "c2", "c3"):
        publish(store, inputs(checkpoint), tflite, METRICS, {})
    monkeypatch.setenv("EDGE_QUANT_ARTIFACT_DIR", str(store))
    monkeypatch.setenv("EDGE_QUANT_KEEP_VERSIONS", "1")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # an instance of its own, and a work folder: nothing to prune
    monkeypatch.setenv("EDGE_QUANT_WORK_DIR", str(tmp_path / "work"))
    assert main(["prune", "--dry-run"]) == 0
    assert "Would remove model/int8 version 1 " in capsys.readouterr().out
    assert len(published_versions(store, "model", "int8")) == 3
    assert main(["prune"]) == 0
    printed = capsys.readouterr().out
    assert "Removed model/int8 version 2 " in printed and "Removed 2 version(s)" in printed
    assert [m["number"] for m in published_versions(store, "model", "int8")] == [3]
    monkeypatch.setenv("EDGE_QUANT_KEEP_VERSIONS", "-1")
    assert main(["prune"]) == 2 and "EDGE_QUANT_KEEP_VERSIONS" in capsys.readouterr().err
