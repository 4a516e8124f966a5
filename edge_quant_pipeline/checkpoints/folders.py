"""The watched folder: which subfolders are checkpoints, under which model id, and when one has stopped changing
(a folder being copied or saved into must not be converted half way)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edge_quant_pipeline.checkpoints.digest import file_stats, hash_checkpoint
from edge_quant_pipeline.checkpoints.validate import (
    ID_RULE,
    UNREADABLE,
    CheckpointError,
    model_id_for,
    validate_checkpoint,
)


@dataclass(frozen=True)
class RefusedFolder:
    """A folder of the watched directory that cannot become a model; ``reason`` names it and the fix."""

    path: Path
    model_id: str | None  # the id it would share with another folder, if any
    reason: str


@dataclass(frozen=True)
class CheckpointScan:
    found: dict[str, Path]  # usable checkpoint folders by model id
    refused: list[RefusedFolder]

    def refusal_for(self, model_id: str) -> str | None:
        return next((r.reason for r in self.refused if r.model_id == model_id), None)

    @property
    def model_ids(self) -> set[str]:
        """The ids of every checkpoint folder there, usable or refused."""
        return {*self.found, *(r.model_id for r in self.refused if r.model_id)}


def _holds_config(folder: Path) -> bool:
    """Raises OSError for a folder that cannot be looked into (permissions)."""
    return folder.is_dir() and (folder / "config.json").is_file()


def scan_checkpoints(root: Path) -> CheckpointScan:
    """Every direct subfolder of ``root`` that holds a ``config.json``: usable ones by model id, and the
    ones refused because their name makes no id, or the same id as another folder's."""
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: checkpoint directory does not exist. Set EDGE_QUANT_CHECKPOINT_DIR to a "
            "directory holding one folder per checkpoint."
        )
    by_id: dict[str, list[Path]] = {}
    refused: list[RefusedFolder] = []
    for folder in sorted(root.iterdir()):
        try:
            if _holds_config(folder):
                by_id.setdefault(model_id_for(folder), []).append(folder)
        except CheckpointError as error:
            refused.append(RefusedFolder(folder, None, str(error)))
        except OSError as error:
            reason = f"{folder}: cannot be read ({error.strerror}); fix its permissions."
            refused.append(RefusedFolder(folder, None, reason))
    for model_id, folders in by_id.items():
        if len(folders) > 1:  # picking one would silently publish the other's weights under this id
            names = " and ".join(repr(f.name) for f in folders)
            reason = (
                f"{root}: folders {names} both make the model id {model_id!r} ({ID_RULE}); neither is converted. "
                "Rename all but one of them."
            )
            refused += [RefusedFolder(folder, model_id, reason) for folder in folders]
    return CheckpointScan({m: f[0] for m, f in by_id.items() if len(f) == 1}, refused)


def find_checkpoints(root: Path) -> dict[str, Path]:
    """The usable checkpoint folders of ``root`` by model id (see ``scan_checkpoints`` for the refused ones)."""
    return scan_checkpoints(root).found


@dataclass(frozen=True)
class SeenCheckpoint:
    """A checkpoint folder as a watcher saw it last."""

    signature: str  # names, sizes and mtimes of its files
    content_hash: str | None = None  # its version, once the signature held still between two looks
    problem: str | None = None  # why it fails the checks that read no tensor data


def folder_signature(path: Path) -> str:
    """Raises OSError when a file vanishes between listing and stat."""
    return json.dumps([(name, stat.st_size, stat.st_mtime_ns) for name, stat in file_stats(path)])


def look_again(path: Path, previous: SeenCheckpoint | None) -> SeenCheckpoint:
    """The folder now. It gets a version once its files held still since ``previous``: the sha256 of its bytes
    once the checks that read no tensor data pass; else (it may be GBs of garbage) ``UNREADABLE`` and a hash of
    its signature, with the problem, so its run, which fails at the `checkpoint` step with the reason, is
    requested once per state of the folder. Raises OSError when a file vanishes while it is read."""
    signature = folder_signature(path)
    if previous is None or previous.signature != signature:
        return SeenCheckpoint(signature)  # still being written, or just appeared
    if previous.content_hash:
        return previous
    try:
        validate_checkpoint(path)
    except CheckpointError as error:
        return SeenCheckpoint(signature, UNREADABLE + hashlib.sha256(signature.encode()).hexdigest()[:16], str(error))
    return SeenCheckpoint(signature, hash_checkpoint(path))
