"""Reading one ``EDGE_QUANT_*`` variable: the error a bad value raises (one line naming the variable, the value and
the fix) and the readers of the kinds of value settings take: folders, whole numbers, switches."""

from __future__ import annotations

import os
from pathlib import Path

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class SettingError(ValueError):
    """An ``EDGE_QUANT_*`` variable the pipeline cannot use; the message names it, its value and the fix.
    Several at once come one per line."""


def shown(name: str, default: object) -> str:
    value = os.environ.get(name)
    return f"{name}={value!r}" if value else f"{name} (not set, so {str(default)!r})"


def env_path(name: str, default: Path | str) -> Path:
    return Path(os.environ.get(name) or default).expanduser().absolute()


def folder(name: str, default: Path | str, fix: str, must_exist: bool) -> Path:
    path = env_path(name, default)
    if path.exists() and not path.is_dir():
        raise SettingError(f"{shown(name, default)}: {path} is not a folder; {fix}.")
    if must_exist and not path.exists():
        raise SettingError(f"{shown(name, default)}: no folder {path}; {fix}.")
    return path


def whole_number(name: str, default: int, what: str, minimum: int = 1) -> int:
    value = os.environ.get(name) or str(default)
    if not value.isdigit() or int(value) < minimum:
        raise SettingError(f"{shown(name, default)}: expected a whole number of at least {minimum}: {what}.")
    return int(value)


def switch(name: str, default: bool, what: str) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() not in _TRUE + _FALSE:
        raise SettingError(
            f"{name}={value!r} is neither on nor off; use 1, true, yes or on, or 0, false, no or off ({what})."
        )
    return value.lower() in _TRUE
