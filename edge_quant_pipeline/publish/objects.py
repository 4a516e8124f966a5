"""One object of the artifact store, on any fsspec filesystem: written whole or not at all, created only where
nothing is, read in one GET; and a work folder's file put into a version, linked where it can be."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from upath import UPath
from upath.implementations.local import LocalPath

from edge_quant_pipeline import atomic

COPY_CHUNK = 1 << 20


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_local(path: UPath) -> bool:
    return isinstance(path, LocalPath)


def write_atomically(path: UPath, content: bytes) -> None:
    """Readers see the old content or the new, never half of it."""
    if is_local(path):
        atomic.write_atomically(Path(path.path), content)
    else:
        path.write_bytes(content)  # one PUT: an object appears whole or not at all


def _json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: UPath, record: dict[str, Any]) -> None:
    write_atomically(path, _json_bytes(record))


def create_json(path: UPath, record: dict[str, Any]) -> bool:
    """Write ``record`` to ``path`` only if nothing is there (an object store's conditional PUT); True if this call
    created it."""
    try:
        path.fs.pipe_file(path.path, _json_bytes(record), mode="create")
    except FileExistsError:
        return False
    return True


def read_whole(path: UPath) -> bytes:
    """One GET on an object store: the object as it was, old or new, while another process replaces it (s3fs's
    file objects pin the ETag they first saw, and fail when the object changes under them)."""
    return path.fs.cat_file(path.path)


def read_json(path: UPath) -> dict[str, Any] | None:
    try:
        return json.loads(read_whole(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def link_or_copy_hashing(source: Path, target: UPath) -> str:
    """A work folder's file (a 2B model's float files and bundle are 20 GB each) is hard-linked into a local store
    on the work folder's filesystem, not copied: the work folder's files are written whole to a new file
    (``atomic_path``) and never in place, so its name for one can never change the published one. Elsewhere,
    copied."""
    if is_local(target) and same_filesystem(source, Path(target.path).parent):
        with atomic.link_or_copy(source, Path(target.path)).open("rb") as linked:
            return hashlib.file_digest(linked, "sha256").hexdigest()
    return atomic.copy_hashing(source, target, COPY_CHUNK)


def same_filesystem(path: Path, folder: Path) -> bool:
    return path.stat().st_dev == folder.stat().st_dev
