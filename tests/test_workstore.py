"""The work store (workstore.py): what one step shares, a step with another work folder finds, byte for byte, in a
local folder store and on moto's S3 server; a replaced or damaged entry fails the step that reads it, naming it; the
work folder keeps at most its cache size of copies."""

import dataclasses
import os
import time
import uuid
from pathlib import Path

import pytest
from conftest import S3_BUCKET
from upath import UPath

from edge_quant_pipeline.workstore import SIDECAR_SUFFIX, SharedFiles, WorkStore, WorkStoreError


@dataclasses.dataclass(frozen=True)
class Output:  # like TfliteModel, FloatReference, CalibrationStats: a path and where the next step finds it
    path: Path
    shared: SharedFiles | None = None


@pytest.fixture(params=["folder", pytest.param("s3", marks=pytest.mark.services)])
def remote(request, tmp_path) -> UPath:
    if request.param == "folder":
        return UPath(tmp_path / "store")
    request.getfixturevalue("s3_endpoint")
    return UPath(f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", use_listings_cache=False)


def worker(tmp_path: Path, name: str, remote: UPath, cache_bytes: int = 10**9) -> WorkStore:
    return WorkStore(tmp_path / name, remote, cache_bytes)


def write(path: Path, size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    content = os.urandom(size)
    path.write_bytes(content)
    return content


def test_what_one_work_folder_shares_another_finds(tmp_path, remote):
    a, b = worker(tmp_path, "a", remote), worker(tmp_path, "b", remote)
    tflite = a.local / "model" / "v1" / "float.tflite"
    model, embedder = write(tflite, 300_000), write(tflite.parent / "float.embedder.tflite", 1000)
    reference = a.local / "model" / "v1" / "float_reference"
    logits = write(reference / "logits.npy", 5000)
    shared = a.shared(Output(tflite), tflite.parent / "float.embedder.tflite")
    shared_reference = a.shared(Output(reference))

    found = b.localize(shared)
    assert found.path == b.local / "model" / "v1" / "float.tflite" and found.path.read_bytes() == model
    assert (found.path.parent / "float.embedder.tflite").read_bytes() == embedder
    assert (b.localize(shared_reference).path / "logits.npy").read_bytes() == logits
    # the copy is kept: found again without the store
    (remote / "model" / "v1" / "float.tflite").unlink()
    assert b.localize(shared).path.read_bytes() == model
    # by key, as a step finds what it was not handed (the float reference of a search, a bundle)
    assert (b.fetch(b.local / "model" / "v1" / "float_reference") / "logits.npy").read_bytes() == logits
    assert b.fetch(b.local / "model" / "v1" / "never-shared") == b.local / "model" / "v1" / "never-shared"


def test_a_replaced_entry_fails_the_step_given_the_old_one(tmp_path, remote):
    a, b = worker(tmp_path, "a", remote), worker(tmp_path, "b", remote)
    tflite = a.local / "model" / "v1" / "q.tflite"
    write(tflite, 1000)
    old = a.shared(Output(tflite))
    write(tflite, 1000)
    a.share(tflite)  # a newer materialization of the same key
    with pytest.raises(WorkStoreError, match="model/v1/q.tflite: the work store holds a newer materialization"):
        b.localize(old)


def test_a_download_that_does_not_match_its_index_leaves_nothing(tmp_path, remote):
    a, b = worker(tmp_path, "a", remote), worker(tmp_path, "b", remote)
    tflite = a.local / "model" / "v1" / "q.tflite"
    write(tflite, 1000)
    shared = a.shared(Output(tflite))
    (remote / "model" / "v1" / "q.tflite").write_bytes(os.urandom(1000))  # not what the index says
    with pytest.raises(WorkStoreError, match="q.tflite changed while it was read"):
        b.localize(shared)
    assert not (b.local / "model" / "v1" / "q.tflite").exists()


def test_the_work_folder_keeps_at_most_its_cache_size(tmp_path):
    a = worker(tmp_path, "a", UPath(tmp_path / "store"), cache_bytes=2_500_000)
    paths = [a.local / "model" / f"v{n}.tflite" for n in range(3)]
    shared, contents = [], []
    for n, path in enumerate(paths):
        contents.append(write(path, 1_000_000))
        shared.append(a.share(path))
        # used two hours ago, the oldest first; a copy used within the hour is never deleted
        hours_ago = time.time() - 7200 + n
        os.utime(path.parent / (path.name + SIDECAR_SUFFIX), (hours_ago, hours_ago))
    write(newest := a.local / "model" / "v3.tflite", 1_000_000)
    a.share(newest)
    assert [p.exists() for p in [*paths, newest]] == [False, False, True, True]
    # an evicted copy is downloaded again when a step asks for it
    assert a.localize(Output(paths[0], shared[0])).path.read_bytes() == contents[0]


def test_without_a_store_the_producing_steps_path_is_used(tmp_path):
    local = WorkStore(tmp_path / "work")
    tflite = tmp_path / "work" / "float.tflite"
    write(tflite, 10)
    output = local.shared(Output(tflite))
    assert output.shared is None and local.localize(output) == output and local.fetch(tflite) == tflite
