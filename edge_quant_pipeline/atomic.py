"""Files that appear whole or not at all: write a hidden sibling, then rename it over the target.

Readers, and other runs writing the same file at the same time, see the old file or a new one, never half of
one; a killed writer leaves at most a hidden sibling. Everything written keeps the umask's permissions, as files
a user copies would (the store is for others to read).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def hidden_sibling(folder: Path, prefix: str, suffix: str = "") -> Path:
    """A fresh name in ``folder`` (64 random bits), for a file or folder that is renamed into place when done."""
    return folder / f"{prefix}{secrets.token_hex(8)}{suffix}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A hidden sibling of ``path`` to write to; renamed over ``path`` when the block succeeds, removed when it
    fails. Readers, and other runs writing the same file at the same time, see the old file or a new one,
    never half of one. The sibling keeps ``path``'s suffix, for writers that add one (``np.savez``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = hidden_sibling(path.parent, f".{path.stem}.tmp-", path.suffix)
    # Created as open() creates files, with the umask's permissions: mkstemp's 0600 would leave published
    # manifests and pointers unreadable to anyone but the pipeline's user. O_EXCL: never another writer's file.
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield Path(name)
        os.replace(name, path)
    finally:
        # Gone after a rename, except where ``name`` was made a hard link of ``path``'s own file: renaming one
        # link of a file over another is a no-op that leaves both.
        Path(name).unlink(missing_ok=True)


def write_atomically(path: Path, content: bytes | bytearray) -> None:
    """Readers never see a half-written file: write a sibling, then rename over."""
    with atomic_path(path) as tmp, tmp.open("wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())


def link_or_copy(source: Path, target: Path) -> Path:
    """``target`` with ``source``'s bytes: a hard link where the filesystem allows (no copy of a large file),
    else a copy; atomically either way. Already ``source``'s file: left as it is."""
    if target.exists() and target.samefile(source):
        return target
    with atomic_path(target) as partial:
        partial.unlink()
        try:
            os.link(source, partial)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, partial)
    return target


def copy_hashing(source, target, chunk_bytes: int) -> str:
    """Copy ``source`` to ``target`` (local paths or UPaths: object stores too) in chunks, and return the sha256 of
    what was copied: every byte is read once."""
    digest = hashlib.sha256()
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(chunk_bytes):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()


@contextmanager
def locked_scratch_beside(output: Path) -> Iterator[Path]:
    """A hidden folder beside ``output``, of this writer alone, locked while in use: for tools that pick their own
    file names (litert-torch's export), and for files one step makes and removes, which another run making the same
    file at the same time must not remove under it (the float bundle). Scratch folders whose lock is free were left
    by killed writers (their partial files can be as large as the model), so they are removed first; a concurrent
    writer's folder is locked and stays."""
    pattern = f".{output.name}.tmp-*"
    for stale in output.parent.glob(pattern):
        try:
            with (stale / ".lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(stale)
        except OSError:  # BlockingIOError: in use; FileNotFoundError: another run removed it first
            continue
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=pattern[:-1]) as scratch:
        with (Path(scratch) / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield Path(scratch)
