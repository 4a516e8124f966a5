"""The artifact store: immutable, atomically published versions on any fsspec filesystem.

Layout (``<store>`` is a local folder or a URL such as ``s3://bucket/prefix``)::

    <store>/<model>/<recipe>/<version>/model.tflite
    <store>/<model>/<recipe>/<version>/model.litertlm     # the LiteRT-LM bundle apps load
    <store>/<model>/<recipe>/<version>/model.embedder.tflite, ...  # where the model has embedders (Gemma 4)
    <store>/<model>/<recipe>/<version>/manifest.json
    <store>/<model>/<recipe>/latest.json          # the version published last, absent once the latest inputs fail
    <store>/<model>/<recipe>/failed.json          # why the current inputs did not publish (or no longer pass)
    <store>/<model>/champion.json                 # the smallest published recipe of the current checkpoint, if any
    <store>/<model>/report.parquet, report.png
    <store>/report.parquet, report.png            # every model

``<version>`` is derived from every input that shapes the model's bytes or its
metrics (``ArtifactInputs``: checkpoint bytes, tokenizer, recipe spec, toolchain,
exporter, export settings, eval text and evaluation settings, gates), all of them
recorded in the manifest; publishing the same inputs twice makes no new version,
and the manifest's ``number`` counts versions per (model, recipe): 1, 2, 3...

A version exists iff its manifest.json exists, and the manifest is written last,
in one step: on a local filesystem the whole version folder is assembled under a
hidden name and renamed into place; on an object store the manifest is one PUT
after the model file. A publish killed half way therefore never shows a version.

Concurrent publishers: on a local (or NFS) folder, one publisher at a time holds an
exclusive ``flock`` on ``<store>/<model>/<recipe>/.publish.lock`` while it picks the
version number, writes the version and points ``latest.json``, so numbers never
repeat; the kernel drops the lock when its holder dies, and the next holder removes
the staging folders dead publishers left. An object store has neither locks nor
renames; there a publisher claims its number by creating ``<recipe>/.numbers/<n>.json``
only if it does not exist (a conditional write: S3's ``If-None-Match: *``, fsspec's
``mode="create"``), so two publishers never take the same number, and writes the
manifest the same way, so of two publishers of the same inputs one publishes and the
other finds it published. What an object store does not give: numbers without gaps (a
publisher that dies after its claim leaves its number unused, unless the same inputs
are published again, which takes the claim back), and ``previous_version`` is the
highest-numbered version published when the manifest is written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from upath import UPath

from edge_quant_pipeline import atomic
from edge_quant_pipeline.disk import check_free_disk
from edge_quant_pipeline.embedders import embedder_path, embedders_of
from edge_quant_pipeline.evaluate.bundle import BUILDER_PACKAGE, builder_version, bundle_path
from edge_quant_pipeline.publish.card import CARD_FILE, model_card
from edge_quant_pipeline.publish.objects import (
    create_json,
    is_local,
    link_or_copy_hashing,
    now,
    read_json,
    same_filesystem,
    write_atomically,
    write_json,
)
from edge_quant_pipeline.settings import ARTIFACT_DIR_VARIABLE, GENERATIVE_API

MANIFEST = "manifest.json"
MODEL_FILE = "model.tflite"
BUNDLE_FILE = "model.litertlm"
FAILURE_RECORD = "failed.json"
LATEST = "latest.json"
CHAMPION = "champion.json"
LOCK = ".publish.lock"
STAGING = ".v-*.tmp-*"  # a version folder being assembled (see _write_version_locally)
NUMBERS = ".numbers"  # on an object store, <recipe>/.numbers/<n>.json: the version that claimed number n
# The metrics a new version is compared on with the one published before it.
DIFF_METRICS = ("file_bytes", "perplexity_ratio", "mean_kl", "top1_agreement", "decode_tokens_per_s")


@dataclass(frozen=True)
class ArtifactInputs:
    """What a published model, its bytes and its metrics, are a function of."""

    model_id: str
    recipe: str
    checkpoint_hash: str
    recipe_hash: str
    toolchain: dict[str, str]
    exporter: str = GENERATIVE_API
    tokenizer_hash: str | None = None
    export: Mapping[str, Any] = field(default_factory=dict)  # prefill and KV cache lengths: in the signatures
    evaluation: Mapping[str, Any] = field(default_factory=dict)  # eval text sha256 and the evaluation settings
    gates: Mapping[str, float] = field(default_factory=dict)
    # calibration text sha256 and samples, for recipes whose quantization is calibrated (static, GPTQ)
    calibration: Mapping[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        """Everything the version is derived from, as the manifest records it."""
        identity = {
            "checkpoint_sha256": self.checkpoint_hash,
            "recipe_sha256": self.recipe_hash,
            "toolchain": self.toolchain,
            "exporter": self.exporter,
            "tokenizer_sha256": self.tokenizer_hash,
            "export": dict(self.export),
            "evaluation_settings": dict(self.evaluation),
            "gates": dict(self.gates),
        }
        # only where it shapes the bytes: recipes without calibration keep the versions they had
        return {**identity, "calibration": dict(self.calibration)} if self.calibration is not None else identity

    @property
    def version(self) -> str:
        key = json.dumps(self.identity(), sort_keys=True)
        return "v-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PublishedArtifact:
    path: UPath  # the version folder
    version: str
    manifest: dict[str, Any]
    newly_published: bool

    @property
    def model_file(self) -> UPath:
        return self.path / MODEL_FILE


@dataclass(frozen=True)
class ChampionUpdate:
    current: dict[str, Any] | None  # None: no recipe of the current checkpoint is published
    previous: dict[str, Any] | None  # the pointer before this update

    @property
    def changed(self) -> bool:
        return _same_version(self.previous) != _same_version(self.current)


def _recipe_dir(store: UPath, inputs: ArtifactInputs) -> UPath:
    return store / inputs.model_id / inputs.recipe


def published_versions(store: UPath, model_id: str, recipe: str) -> list[dict[str, Any]]:
    """The manifests of every visible version of (model, recipe), oldest first."""
    try:
        children = list((store / model_id / recipe).iterdir())
    except (FileNotFoundError, NotADirectoryError):  # fsspec says the latter for a missing prefix
        return []
    manifests = [read_json(child / MANIFEST) for child in children if child.name.startswith("v-")]
    return sorted((m for m in manifests if m is not None), key=version_number)


def version_number(manifest: dict[str, Any]) -> int:
    return manifest.get("number", 0)  # 0: published before versions were numbered


def metric_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in DIFF_METRICS if name in before and name in after}


def _write_files(folder: UPath, tflite: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The model file, its embedders (``embedders.py``) and its LiteRT-LM bundle (``evaluate/bundle.py``); the manifest
    that will make them a version, with their hashes."""
    model_file = folder / MODEL_FILE
    embedders = {
        role: link_or_copy_hashing(path, embedder_path(model_file, role)) for role, path in embedders_of(tflite).items()
    }
    manifest = {**manifest, "model_sha256": link_or_copy_hashing(tflite, model_file)}
    if embedders:
        manifest["embedder_sha256"] = embedders
    if bundle_path(tflite).exists():
        manifest["bundle_sha256"] = link_or_copy_hashing(bundle_path(tflite), folder / BUNDLE_FILE)
        manifest["bundle_builder"] = f"{BUILDER_PACKAGE}=={builder_version()}"
    return _with_card(folder, manifest)


def _with_card(folder: UPath, manifest: dict[str, Any]) -> dict[str, Any]:
    """The version's model card written from ``manifest`` (``card.py``), and the manifest with its sha256."""
    card = model_card(manifest).encode()
    write_atomically(folder / CARD_FILE, card)
    return {**manifest, "model_card_sha256": hashlib.sha256(card).hexdigest()}


def _version_bytes(tflite: Path, folder: Path) -> int:
    """What a version of ``tflite`` in ``folder`` takes of its disk: the model, its embedders and its bundle, unless
    they are linked there (``link_or_copy_hashing``)."""
    if same_filesystem(tflite, folder):
        return 0
    bundle = bundle_path(tflite)
    files = (tflite, *embedders_of(tflite).values(), *([bundle] if bundle.exists() else []))
    return sum(path.stat().st_size for path in files)


def _write_version_locally(target: Path, tflite: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    staging = atomic.hidden_sibling(target.parent, f".{target.name}.tmp-")
    staging.mkdir()  # with the umask's permissions, unlike mkdtemp's 0700: the version is for others to read
    try:
        manifest = _write_files(UPath(staging), tflite, manifest)
        write_json(UPath(staging) / MANIFEST, manifest)
        os.rename(staging, target)  # atomic: the version appears whole
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


@contextmanager
def one_writer_at_a_time(recipe_dir: UPath) -> Iterator[None]:
    """On a local store, hold the (model, recipe) folder's lock (publishers and retention take it); staging folders
    found under it are left by publishers that died (a live one would hold the lock), so they go. No-op on object
    stores."""
    if not is_local(recipe_dir):
        yield
        return
    folder = Path(recipe_dir.path)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK).open("a") as lock:  # closing it, or the process dying, releases the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        for abandoned in folder.glob(STAGING):
            shutil.rmtree(abandoned, ignore_errors=True)
        yield


def _point_latest(recipe_dir: UPath, manifest: dict[str, Any]) -> None:
    pointer = {key: manifest.get(key) for key in ("version", "number", "artifact_path", "published_at")}
    if read_json(recipe_dir / LATEST) != pointer:
        write_json(recipe_dir / LATEST, pointer)


def _claim_number(recipe_dir: UPath, inputs: ArtifactInputs, versions: list[dict[str, Any]]) -> int:
    """On an object store, the number this version takes: the next after every number published or claimed,
    claimed by creating ``.numbers/<n>.json`` only if it is absent, so that of two publishers one gets it and the
    other tries the next. A claim these inputs made before (a publish that died) is taken back."""
    numbers = recipe_dir / NUMBERS
    try:
        claims = {int(path.stem): read_json(path) for path in numbers.iterdir() if path.stem.isdigit()}
    except (FileNotFoundError, NotADirectoryError):
        claims = {}
    ours = [n for n, claim in claims.items() if claim and claim.get("version") == inputs.version]
    if ours:
        return min(ours)
    number = max([*claims, *map(version_number, versions)], default=0) + 1
    while not create_json(numbers / f"{number}.json", {"version": inputs.version, "claimed_at": now()}):
        claim = read_json(numbers / f"{number}.json")
        if claim and claim.get("version") == inputs.version:  # the same inputs, published at the same moment
            return number
        number += 1
    return number


def _new_manifest(
    store: UPath,
    inputs: ArtifactInputs,
    target: UPath,
    metrics: dict[str, Any],
    details: dict[str, Any],
    number: int,
) -> dict[str, Any]:
    """Version ``number``, diffed against the highest-numbered version published before it."""
    versions = published_versions(store, inputs.model_id, inputs.recipe)
    before = [m for m in versions if version_number(m) < number]
    previous = before[-1] if before else None
    return {
        "model": inputs.model_id,
        "recipe": inputs.recipe,
        "version": inputs.version,
        "number": number,
        "previous_version": previous["version"] if previous else None,
        "delta": metric_delta(previous["metrics"], metrics) if previous else {},
        **inputs.identity(),
        "model_file": MODEL_FILE,
        "artifact_path": str(target),
        "published_at": now(),
        "metrics": metrics,
        **details,
    }


def _reevaluated(
    store: UPath, manifest: dict[str, Any], tflite: Path, metrics: dict[str, Any], details: dict[str, Any]
) -> dict[str, Any]:
    """An existing version with the metrics of its latest evaluation (latency moves between runs of the same
    bytes; the manifest says what the UI says), diffed again against the version before it. A file whose bytes
    differ from the published ones is not what was published: its metrics are not written."""
    with tflite.open("rb") as stream:
        if hashlib.file_digest(stream, "sha256").hexdigest() != manifest.get("model_sha256"):
            return manifest
    previous = next(
        (
            m
            for m in published_versions(store, manifest["model"], manifest["recipe"])
            if m["version"] == manifest.get("previous_version")
        ),
        None,
    )
    return {
        **manifest,
        **details,
        "metrics": metrics,
        "delta": metric_delta(previous["metrics"], metrics) if previous else {},
        "evaluated_at": now(),
    }


def _write_version_to_object_store(
    store: UPath,
    inputs: ArtifactInputs,
    target: UPath,
    tflite: Path,
    metrics: dict[str, Any],
    details: dict[str, Any],
) -> tuple[dict[str, Any], bool]:
    """Files first, then the manifest in one conditional write: readers trust only versions with a manifest. A
    publisher of the same inputs that wrote it first has published them (its manifest, and False)."""
    versions = published_versions(store, inputs.model_id, inputs.recipe)
    number = _claim_number(_recipe_dir(store, inputs), inputs, versions)
    manifest = _write_files(target, tflite, _new_manifest(store, inputs, target, metrics, details, number))
    if create_json(target / MANIFEST, manifest):
        return manifest, True
    winner = read_json(target / MANIFEST)
    _with_card(target, winner)  # this publisher's card went over the winner's: it says what the manifest says again
    return winner, False


def publish(
    store: UPath, inputs: ArtifactInputs, tflite: Path, metrics: dict[str, Any], details: dict[str, Any]
) -> PublishedArtifact:
    """Publish ``tflite`` with a manifest of ``inputs``, ``metrics`` and ``details``; the same inputs again make
    no new version, only refresh its manifest's metrics."""
    recipe_dir = _recipe_dir(store, inputs)
    target = recipe_dir / inputs.version
    with one_writer_at_a_time(recipe_dir):
        manifest = read_json(target / MANIFEST)
        newly_published = manifest is None
        if newly_published and is_local(target):  # numbered under the lock: the next after the highest
            versions = published_versions(store, inputs.model_id, inputs.recipe)
            number = version_number(versions[-1]) + 1 if versions else 1
            manifest = _new_manifest(store, inputs, target, metrics, details, number)
            check_free_disk(Path(recipe_dir.path), _version_bytes(tflite, Path(recipe_dir.path)), ARTIFACT_DIR_VARIABLE)
            manifest = _write_version_locally(Path(target.path), tflite, manifest)
        elif newly_published:
            manifest, newly_published = _write_version_to_object_store(store, inputs, target, tflite, metrics, details)
        elif (refreshed := _reevaluated(store, manifest, tflite, metrics, details)) is not manifest:
            manifest = _with_card(target, refreshed)  # the card says what the manifest says
            write_json(target / MANIFEST, manifest)  # one atomic write: readers see the old manifest or this one
        # Also repairs a publish killed between manifest and pointer, and brings back an existing version that
        # failed an evaluation since: these inputs passed their latest one.
        _point_latest(recipe_dir, manifest)
        (recipe_dir / FAILURE_RECORD).unlink(missing_ok=True)
    return PublishedArtifact(target, inputs.version, manifest, newly_published)


def record_failure(store: UPath, inputs: ArtifactInputs, stage: str, error: str) -> None:
    """Say why these inputs have no published version, and withdraw ``latest.json``, which would otherwise name
    a version of older inputs or one that no longer passes. The versions themselves stay untouched."""
    recipe_dir = _recipe_dir(store, inputs)
    write_json(
        recipe_dir / FAILURE_RECORD,
        {
            "version": inputs.version,
            "checkpoint_sha256": inputs.checkpoint_hash,
            "recipe_sha256": inputs.recipe_hash,
            "stage": stage,
            "error": error,
            "failed_at": now(),
        },
    )
    (recipe_dir / LATEST).unlink(missing_ok=True)


def published_manifest(store: UPath, inputs: ArtifactInputs) -> dict[str, Any] | None:
    return read_json(_recipe_dir(store, inputs) / inputs.version / MANIFEST)


def failure_record(store: UPath, inputs: ArtifactInputs) -> dict[str, Any] | None:
    record = read_json(_recipe_dir(store, inputs) / FAILURE_RECORD)
    return record if record is not None and record.get("version") == inputs.version else None


def latest_outcome(store: UPath, inputs: ArtifactInputs) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(manifest, failure record) of the latest evaluation of these inputs, at most one of them: a failure
    recorded for this version beside its manifest came after it (publishing removes the record), so the version
    no longer counts as published, though it stays in the store."""
    failure = failure_record(store, inputs)
    return (None, failure) if failure is not None else (published_manifest(store, inputs), None)


def latest_pointer(store: UPath, model_id: str, recipe: str) -> dict[str, Any] | None:
    return read_json(store / model_id / recipe / LATEST)


def _same_version(pointer: dict[str, Any] | None) -> tuple[str, str] | None:
    return None if pointer is None else (pointer["recipe"], pointer["version"])


def point_champion(store: UPath, model_id: str, champion: dict[str, Any] | None) -> ChampionUpdate:
    """Point ``<store>/<model>/champion.json`` at ``champion`` (recipe, version, ...) unless it already does.
    Without a champion the pointer is removed: kept, it would name an artifact of an older checkpoint or one
    that failed its latest evaluation."""
    path = store / model_id / CHAMPION
    update = ChampionUpdate(current=champion, previous=read_json(path))
    if update.changed and champion is None:
        path.unlink(missing_ok=True)
    elif update.changed:
        write_json(path, {**champion, "chosen_at": now()})
    return update
