"""A checkpoint's version: the sha256 of its bytes, remembered per state of its files.

Hashing reads every byte: 7.5 GB for a 4B model, seconds of a re-run in which nothing changed. So each digest is
kept under the state of the files it was read from (path, size, modification and change times, inode: what git's
index compares); a file written again changes its change time, which no tool sets back, so a changed checkpoint
is always read again. A state seen while a file was still within ``_SETTLE_NS`` of being written is not kept
(git's "racily clean" files): a write in that same clock tick could follow unseen.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from edge_quant_pipeline.atomic import write_atomically

_SETTLE_NS = 2_000_000_000


def file_sha256(path: Path) -> str | None:
    """None when there is no such file."""
    try:
        with path.open("rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def hash_checkpoint(checkpoint_dir: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order; remembered per state of the files.

    Raises OSError when a file cannot be read or vanishes while it is read.
    """
    state = _files_state(checkpoint_dir)
    remembered = _remembered(state)
    if remembered.is_file() and re.fullmatch("[0-9a-f]{64}", known := remembered.read_text()):
        return known
    digest = hashlib.sha256()
    for file in _files(checkpoint_dir):
        digest.update(file.relative_to(checkpoint_dir).as_posix().encode() + b"\0")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    content_hash = digest.hexdigest()
    if _settled(state) and _files_state(checkpoint_dir) == state:
        try:
            write_atomically(remembered, content_hash.encode())
        except OSError:  # a cache that cannot be written costs the next run a hash, nothing else
            pass
    return content_hash


def _files(checkpoint_dir: Path) -> list[Path]:
    return sorted(p for p in checkpoint_dir.rglob("*") if p.is_file())


def file_stats(checkpoint_dir: Path) -> list[tuple[str, os.stat_result]]:
    """Each file's path relative to the folder and its ``stat``, sorted. Raises OSError when a file vanishes
    between listing and stat."""
    return [(f.relative_to(checkpoint_dir).as_posix(), f.stat()) for f in _files(checkpoint_dir)]


def _files_state(checkpoint_dir: Path) -> list[tuple]:
    return [
        (str(checkpoint_dir.resolve()), name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev)
        for name, s in file_stats(checkpoint_dir)
    ]


def _settled(state: list[tuple]) -> bool:
    newest = max((max(entry[3], entry[4]) for entry in state), default=0)
    return time.time_ns() - newest > _SETTLE_NS


def _remembered(state: list[tuple]) -> Path:
    """Where the digest of ``state`` is kept: the user's cache folder (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "edge-quant" / "checkpoint-sha256" / hashlib.sha256(json.dumps(state).encode()).hexdigest()
