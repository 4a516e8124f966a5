"""The local artifact store: one immutable, atomically published folder per version.

Layout::

    <store>/<model>/<recipe>/<version>/model.tflite
    <store>/<model>/<recipe>/<version>/manifest.json
    <store>/<model>/<recipe>/failed.json          # why the current inputs did not publish
    <store>/<model>/report.parquet

``<version>`` is derived from the content of the inputs (checkpoint bytes,
recipe spec, toolchain), so publishing the same inputs twice is a no-op. A
version is assembled in a hidden temporary folder and renamed into place in
one step, manifest included, so readers never see half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_quant_pipeline.convert import write_atomically

MANIFEST = "manifest.json"
MODEL_FILE = "model.tflite"
FAILURE_RECORD = "failed.json"


@dataclass(frozen=True)
class ArtifactInputs:
    """What a published model is a function of."""

    model_id: str
    recipe: str
    checkpoint_hash: str
    recipe_hash: str
    toolchain: dict[str, str]

    @property
    def version(self) -> str:
        key = json.dumps([self.checkpoint_hash, self.recipe_hash, self.toolchain], sort_keys=True)
        return "v-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PublishedArtifact:
    path: Path  # the version folder
    version: str
    manifest: dict[str, Any]
    newly_published: bool

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _recipe_dir(store: Path, inputs: ArtifactInputs) -> Path:
    return store / inputs.model_id / inputs.recipe


def publish(store: Path, inputs: ArtifactInputs, tflite: Path, details: dict[str, Any]) -> PublishedArtifact:
    """Publish ``tflite`` with a manifest of ``inputs`` and ``details``; idempotent."""
    target = _recipe_dir(store, inputs) / inputs.version
    if (target / MANIFEST).is_file():
        manifest = json.loads((target / MANIFEST).read_text())
        return PublishedArtifact(target, inputs.version, manifest, newly_published=False)

    manifest = {
        "model": inputs.model_id,
        "recipe": inputs.recipe,
        "version": inputs.version,
        "checkpoint_sha256": inputs.checkpoint_hash,
        "recipe_sha256": inputs.recipe_hash,
        "toolchain": inputs.toolchain,
        "model_file": MODEL_FILE,
        "model_sha256": hashlib.sha256(tflite.read_bytes()).hexdigest(),
        "published_at": now(),
        **details,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{inputs.version}.tmp-"))
    try:
        shutil.copyfile(tflite, staging / MODEL_FILE)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.rename(staging, target)  # atomic; fails if a concurrent publisher won, which is fine
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / MANIFEST).is_file():
            raise
    (_recipe_dir(store, inputs) / FAILURE_RECORD).unlink(missing_ok=True)
    return PublishedArtifact(target, inputs.version, manifest, newly_published=True)


def record_failure(store: Path, inputs: ArtifactInputs, stage: str, error: str) -> None:
    """Say why these inputs have no published version; earlier versions stay untouched."""
    record = {"version": inputs.version, "checkpoint_sha256": inputs.checkpoint_hash,
              "recipe_sha256": inputs.recipe_hash, "stage": stage, "error": error, "failed_at": now()}
    write_atomically(_recipe_dir(store, inputs) / FAILURE_RECORD, (json.dumps(record, indent=2) + "\n").encode())


def published_manifest(store: Path, inputs: ArtifactInputs) -> dict[str, Any] | None:
    path = _recipe_dir(store, inputs) / inputs.version / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def failure_record(store: Path, inputs: ArtifactInputs) -> dict[str, Any] | None:
    path = _recipe_dir(store, inputs) / FAILURE_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("version") == inputs.version else None
