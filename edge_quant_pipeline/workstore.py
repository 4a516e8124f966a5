"""How intermediate files cross from one step to the next, when steps run on machines that share no disk.

Without a work store (the default) every step reads the files the step before it left in its work folder
(``EDGE_QUANT_WORK_DIR``): one machine, or pods that mount one volume. With ``EDGE_QUANT_WORK_STORE`` set to an
fsspec URL (``s3://bucket/work``), no step reads another's disk:

- a step that makes a file another step needs (the float and quantized ``.tflite`` with their embedders, the
  float reference, the calibration statistics, the LiteRT-LM bundle) uploads it to ``<store>/<key>``, the key
  being its path under the work folder (``<model>/<version folder>/<name>``), then ``<key>.index.json`` naming
  each file's sha256 (the commit marker: an entry without one is not there yet);
- a step that needs it finds it in its own work folder at the same key if the copy there has the same sha256
  (a local ``<key>.shared.json`` says which), and downloads it otherwise, checking every file's sha256;
- the work folder is then a cache of the store: when its entries outgrow ``EDGE_QUANT_WORK_CACHE_GB``, the least
  recently used ones are deleted (never one used in the last hour).

The store is written by one step per key at a time (Dagster runs one run per partition at a time); a newer
materialization of a key replaces it, and a step given the older one fails naming the key rather than read a mix.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from upath import UPath

from edge_quant_pipeline.atomic import atomic_path, copy_hashing, write_atomically

INDEX_SUFFIX = ".index.json"  # in the store, beside an entry: its files and their sha256
SIDECAR_SUFFIX = ".shared.json"  # in a work folder, beside a copy of an entry: the same index
COPY_CHUNK = 8 * 2**20
# A copy used this recently is never evicted: a step may hold several inputs, pulled one after the other.
RECENTLY_USED_SECONDS = 3600


class WorkStoreError(RuntimeError):
    """An entry the store does not hold, or no longer holds as the step was given it."""


@dataclass(frozen=True)
class SharedFiles:
    """An entry of the work store: its key (its path under any work folder) and the digest of its files."""

    key: str
    digest: str


class Localizable(Protocol):
    path: Path
    shared: SharedFiles | None


Output = TypeVar("Output", bound=Localizable)


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _copy_hashing(source, target) -> str:
    return copy_hashing(source, target, COPY_CHUNK)


@dataclass(frozen=True)
class WorkStore:
    """This process's work folder and, when steps share no disk, the store intermediates cross through."""

    local: Path
    remote: UPath | None = None
    cache_bytes: int = 20 * 10**9

    def share(self, path: Path, *siblings: Path) -> SharedFiles | None:
        """Upload ``path`` (a file or a folder) and ``siblings`` (files beside it) to the store, under the key
        ``path`` has in the work folder. None without a store: the next step reads ``path`` itself."""
        if self.remote is None:
            return None
        key = self._key(path)
        files: dict[str, str] = {}
        for file in _files(path, siblings):
            name = file.relative_to(path.parent).as_posix()
            target = self._remote_of(key, name)
            target.parent.mkdir(parents=True, exist_ok=True)  # a local store's folders (object stores have none)
            files[name] = _copy_hashing(file, target)
        index = {"key": key, "files": files, "sizes": {n: (path.parent / n).stat().st_size for n in files}}
        (self.remote / (key + INDEX_SUFFIX)).write_bytes(json.dumps(index).encode())  # one PUT, whole or absent
        write_atomically(self._sidecar(path), json.dumps(index).encode())
        self._evict()
        return SharedFiles(key, _digest(files))

    def shared(self, output: Output, *siblings: Path) -> Output:
        """``output`` with its files uploaded, as the next step will find them."""
        return dataclasses.replace(output, shared=self.share(output.path, *siblings))

    def localize(self, output: Output) -> Output:
        """``output`` with its files in this work folder (downloaded if not there already)."""
        if output.shared is None:  # no store: the producing step's path is this step's too
            return output
        path = self._pull(output.shared.key, output.shared.digest)
        return dataclasses.replace(output, path=path)

    def fetch(self, path: Path) -> Path:
        """``path`` of this work folder, downloaded if the store holds a newer copy of it (the latest a step
        shared; an entry the store does not hold is left to the caller, who finds ``path`` missing)."""
        if self.remote is None or not (self.remote / (self._key(path) + INDEX_SUFFIX)).exists():
            return path
        return self._pull(self._key(path), None)

    def _key(self, path: Path) -> str:
        return path.relative_to(self.local).as_posix()

    def _remote_of(self, key: str, name: str) -> UPath:
        """Where a file of the entry ``key`` is: its name is relative to the folder the entry is in."""
        folder = posixpath.dirname(key)
        return self.remote / folder / name if folder else self.remote / name

    def _sidecar(self, path: Path) -> Path:
        return path.parent / (path.name + SIDECAR_SUFFIX)

    def _pull(self, key: str, digest: str | None) -> Path:
        path = self.local / key
        with _locked(path):
            try:
                stored = self.remote / (key + INDEX_SUFFIX)
                index = json.loads(stored.fs.cat_file(stored.path))
            except FileNotFoundError:
                raise WorkStoreError(f"{self.remote / key}: not in the work store; materialize it again.") from None
            if digest is not None and _digest(index["files"]) != digest:
                raise WorkStoreError(
                    f"{self.remote / key}: the work store holds a newer materialization than this run's input; "
                    "launch the run again."
                )
            sidecar = self._sidecar(path)
            if sidecar.exists() and json.loads(sidecar.read_text())["files"] == index["files"]:
                os.utime(sidecar)  # recently used: evicted last
            else:
                self._download(path, index)
        self._evict()
        return path

    def _download(self, path: Path, index: dict) -> None:
        _remove(path, index)
        for name, sha256 in index["files"].items():
            with atomic_path(path.parent / name) as partial:
                if _copy_hashing(self._remote_of(index["key"], name), partial) != sha256:
                    raise WorkStoreError(
                        f"{self.remote / index['key']}: {name} changed while it was read (a newer materialization "
                        "replaced it); launch the run again."
                    )
        write_atomically(self._sidecar(path), json.dumps(index).encode())

    def _evict(self) -> None:
        """Delete the least recently used copies until what is left fits in ``cache_bytes``, if it can."""
        copies = sorted(_copies(self.local), key=lambda copy: copy[0])
        total = sum(size for _, _, size in copies)
        for _, sidecar, size in copies:
            if total <= self.cache_bytes or not _unused(sidecar):
                break
            path = sidecar.parent / sidecar.name.removesuffix(SIDECAR_SUFFIX)
            with _locked(path):
                if not _unused(sidecar):  # deleted, or used, by another process meanwhile
                    continue
                _remove(path, json.loads(sidecar.read_text()))
                sidecar.unlink()
            total -= size


def _unused(sidecar: Path) -> bool:
    try:
        return time.time() - sidecar.stat().st_mtime >= RECENTLY_USED_SECONDS
    except FileNotFoundError:
        return False


def _copies(local: Path) -> Iterator[tuple[float, Path, int]]:
    """(last used, sidecar, bytes) of every copy in the work folder; one another process deletes meanwhile is
    left out."""
    for sidecar in local.rglob("*" + SIDECAR_SUFFIX):
        try:
            yield sidecar.stat().st_mtime, sidecar, sum(json.loads(sidecar.read_text())["sizes"].values())
        except FileNotFoundError:
            continue


def _files(path: Path, siblings: tuple[Path, ...]) -> list[Path]:
    if path.is_dir():  # hidden files are locks and half-written siblings
        return sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [path, *(s for s in siblings if s.exists())]


def _remove(path: Path, index: dict) -> None:
    for name in index["files"]:
        (path.parent / name).unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time downloads or deletes a copy (steps of several runs may share a work folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (path.parent / f".{path.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
