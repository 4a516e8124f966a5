"""Disk, checked before the files are written: a step that would fill the disk is refused with what it needs."""

import shutil
from pathlib import Path

GB = 1 << 30
# Left free beyond a step's own files: the instance's storage, logs and other runs' small files live there too.
MARGIN_BYTES = 1 * GB


class NotEnoughDiskError(RuntimeError):
    """The files a step writes would not fit on the disk they go to."""


def check_free_disk(folder: Path, needed_bytes: int, setting: str) -> None:
    """Raise ``NotEnoughDiskError`` unless ``folder``'s disk has ``needed_bytes`` free beyond the margin; the
    message names the folder, both sizes and ``setting`` (the variable that points elsewhere)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed_bytes + MARGIN_BYTES:
        raise NotEnoughDiskError(
            f"{folder}: this step writes about {needed_bytes / GB:.1f} GB and the disk has {free / GB:.1f} GB free "
            f"(keeping {MARGIN_BYTES / GB:.0f} GB spare). Free space there, or set {setting} to a disk with room."
        )
