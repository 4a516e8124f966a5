"""Measurements as the UI shows them: byte counts as sizes, numbers to the digits they carry.

Raw values go to the manifest and the report; a step's metadata is for reading, so ``12345678`` bytes reads
``12.3 MB`` (under ``*_size``), ``0.000321456789`` reads ``0.0003215``, and a step's 0.0012 s of waiting reads
``0.0``. Numbers stay numbers, so the UI can still plot them across materializations; units are in the names
(``_ms``, ``_s``, ``_mb``, ``_db``, ``_per_s``).
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg

SIGNIFICANT = 4  # a ratio of 1.0034 keeps its 0.0034; a KL of 3.2e-4 keeps 3 digits past its first
ERROR_SIGNIFICANT = 2  # a standard error says how far the digits above can be trusted, no more
_SIZE_UNITS = ("B", "kB", "MB", "GB", "TB")  # decimal, as the report's MB columns


def for_ui(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with each ``*_bytes`` count shown as a size under ``*_size``, and each float rounded."""
    return dict(_shown(name, value) for name, value in values.items())


def size_text(count: int) -> str:
    size, unit = float(count), 0
    while size >= 1000 and unit < len(_SIZE_UNITS) - 1:
        size, unit = size / 1000, unit + 1
    return f"{count} B" if unit == 0 else f"{size:.1f} {_SIZE_UNITS[unit]}"


def _shown(name: str, value: Any) -> tuple[str, Any]:
    if name.endswith("_bytes") and isinstance(value, int) and not isinstance(value, bool):
        return name.removesuffix("_bytes") + "_size", dg.MetadataValue.text(size_text(value))
    if isinstance(value, float):
        if name.endswith("_mb"):  # memory: a megabyte is finer than anything measured here
            return name, round(value, 0)
        if name.endswith(("_s", "_ms")) and not name.endswith("_per_s"):  # a time: to a hundredth of its unit
            return name, round(value, 2)
        return name, _significant(value, ERROR_SIGNIFICANT if name.endswith("_error") else SIGNIFICANT)
    return name, value


def _significant(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")
