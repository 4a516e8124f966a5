"""Retention: the store keeps the newest versions of each (model, recipe), and every version a pointer names.

Of each ``<store>/<model>/<recipe>/``, the ``keep`` highest-numbered versions stay (``EDGE_QUANT_KEEP_VERSIONS``,
5 by default; 0 keeps every one), and so do the version ``latest.json`` names and the one ``champion.json`` names,
whatever their numbers: what an app or a reader was pointed at never goes. Every other version is removed
manifest first, the way it was published manifest last: a version exists iff its manifest does, so a reader sees
it whole or not at all, and a removal killed half way leaves files that no reader trusts (on a local store the next
pruning takes them). On a local store the (model, recipe) lock is held meanwhile, so no publisher writes the same
version then.

Applied by ``published_artifact`` after each publish (to its own (model, recipe)) and by ``edge-quant prune`` to the
whole store, ``--dry-run`` to see what it would remove.

``edge-quant prune`` also empties the work folder of what no current step reads (``stale_work``): folders of other
checkpoint versions, exporters and export settings, float references and calibration statistics of other texts,
quantized files of recipe versions no step reads now, and models without a current checkpoint; never while a run
is in progress, and not with a work store, whose copies the work folder already holds as a bounded cache
(``workstore.py``).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from upath import UPath

from edge_quant_pipeline.publish.objects import is_local, read_json
from edge_quant_pipeline.publish.store import (
    CHAMPION,
    MANIFEST,
    latest_pointer,
    one_writer_at_a_time,
    published_versions,
    version_number,
)

# <recipe>-<12 hex digits of its spec hash>, then .tflite, .litertlm or .<embedder role>.tflite
_RECIPE_VERSION = re.compile(r"^([\w]+-[0-9a-f]{12})\.")


@dataclass(frozen=True)
class RemovedVersion:
    model: str
    recipe: str
    version: str
    number: int | None  # None: files a removal killed half way left, without their manifest
    path: UPath
    bytes: int

    def describe(self) -> str:
        number = f"version {self.number}" if self.number is not None else "files of a half-removed version"
        return f"{self.model}/{self.recipe} {number} ({self.version}), {self.bytes / 1e6:,.1f} MB"


def prune_versions(store: UPath, model_id: str, recipe: str, keep: int, dry_run: bool = False) -> list[RemovedVersion]:
    """Remove (with ``dry_run``, only list) the versions of (model, recipe) that retention does not keep."""
    if keep == 0:
        return []
    recipe_dir = store / model_id / recipe
    if dry_run:  # no lock: it would also clear what dead publishers left
        return _removable(store, model_id, recipe, keep)
    with one_writer_at_a_time(recipe_dir):
        removed = _removable(store, model_id, recipe, keep)
        for version in removed:
            _remove(version.path)
    return removed


def _removable(store: UPath, model_id: str, recipe: str, keep: int) -> list[RemovedVersion]:
    recipe_dir = store / model_id / recipe
    versions = [(recipe_dir / m["version"], m) for m in _not_kept(store, model_id, recipe, keep)]
    return [_sized(folder, model_id, recipe, m) for folder, m in versions + _half_removed(recipe_dir)]


def prune_store(store: UPath, keep: int, dry_run: bool = False) -> list[RemovedVersion]:
    """``prune_versions`` for every (model, recipe) in the store."""
    return [
        version
        for model_dir in _folders(store)
        for recipe_dir in _folders(model_dir)
        for version in prune_versions(store, model_dir.name, recipe_dir.name, keep, dry_run)
    ]


def _not_kept(store: UPath, model_id: str, recipe: str, keep: int) -> list[dict]:
    versions = published_versions(store, model_id, recipe)  # oldest first
    named = {(latest_pointer(store, model_id, recipe) or {}).get("version")}
    champion = read_json(store / model_id / CHAMPION) or {}
    if champion.get("recipe") == recipe:
        named.add(champion.get("version"))
    newest = {m["version"] for m in sorted(versions, key=version_number)[-keep:]}
    return [m for m in versions if m["version"] not in newest | named]


def _half_removed(recipe_dir: UPath) -> list[tuple[UPath, None]]:
    """Version folders without a manifest. Only on a local store, under the lock, are these what a killed removal
    left (a local version appears whole, by one rename); on an object store one may be a version being uploaded,
    whose manifest comes last, so they stay."""
    if not is_local(recipe_dir):
        return []
    return [(f, None) for f in _folders(recipe_dir) if f.name.startswith("v-") and not (f / MANIFEST).exists()]


def _sized(folder: UPath, model_id: str, recipe: str, manifest: dict | None) -> RemovedVersion:
    return RemovedVersion(
        model=model_id,
        recipe=recipe,
        version=folder.name,
        number=version_number(manifest) if manifest is not None else None,
        path=folder,
        bytes=int(folder.fs.du(folder.path)),
    )


def _remove(folder: UPath) -> None:
    (folder / MANIFEST).unlink(missing_ok=True)  # from here on the version does not exist, for every reader
    folder.fs.rm(folder.path, recursive=True)


def _folders(path: UPath | Path) -> list:
    """Subfolders by name, without hidden ones (a version being assembled, an export's scratch folder)."""
    try:
        children = [child for child in path.iterdir() if child.is_dir() and not child.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):  # fsspec says the latter for a missing prefix
        return []
    return sorted(children, key=lambda child: child.name)


@dataclass(frozen=True)
class StaleWork:
    """A folder of the work folder that no current step reads."""

    path: Path
    bytes: int
    reason: str

    def describe(self) -> str:
        return f"{self.path} ({self.bytes / 1e6:,.1f} MB): {self.reason}"


@dataclass(frozen=True)
class CurrentWork:
    """What the latest materializations of a model's per-checkpoint assets recorded."""

    folder: Path  # of its checkpoint version, exporter and export settings
    paths: tuple[Path, ...]  # the float file, float reference and calibration statistics in it
    quantized: tuple[Path, ...] = ()  # each current recipe's quantized file (its embedders and bundle beside it)


def stale_work(work_dir: Path, current: Mapping[str, CurrentWork]) -> list[StaleWork]:
    """What the work folder holds besides ``current`` (per model id). A model without current work loses its whole
    folder; every other folder beside the current one is of another checkpoint version, exporter or export
    settings; float references and calibration statistics other than the current ones go too, and the files of
    recipe versions no current step reads (``<recipe>-<hash>`` with its embedders and bundle: a recipe since
    edited, or gone from the catalog)."""
    stale = []
    for model_dir in _folders(work_dir):
        work = current.get(model_dir.name)
        if work is None:
            reason = "no checkpoint of this model is current (its folder is gone, or it never converted)"
            stale.append(_stale(model_dir, reason))
            continue
        reason = "another checkpoint version, exporter or export settings"
        stale += [_stale(f, reason) for f in _folders(model_dir) if f != work.folder]
        stale += [
            _stale(f, "made from another eval or calibration text")
            for f in _folders(work.folder)
            if f.name.startswith(("float_reference-", "calibration-")) and f not in work.paths
        ]
        current_recipes = {_recipe_version(f) for f in work.quantized}
        stale += [
            _stale(f, "a recipe version no current step reads (the recipe was edited or left the catalog)")
            for f in sorted(work.folder.iterdir())
            if f.is_file() and (version := _recipe_version(f)) and version not in current_recipes
        ]
    return stale


def _recipe_version(file: Path) -> str | None:
    """``<recipe>-<hash>`` of a quantization's file, its embedders' and its bundle's (``defs/quantize.py`` names
    them); None for another file."""
    match = _RECIPE_VERSION.match(file.name)
    return match.group(1) if match else None


def remove_stale_work(stale: list[StaleWork]) -> None:
    for work in stale:
        if work.path.is_dir():
            shutil.rmtree(work.path, ignore_errors=True)
        else:
            work.path.unlink(missing_ok=True)


def _stale(path: Path, reason: str) -> StaleWork:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return StaleWork(path, sum(f.stat().st_size for f in files), reason)
