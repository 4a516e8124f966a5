"""Defaults and environment variables: the knobs a user sets without touching code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
DEMO_CHECKPOINT_DIR = PACKAGE_DIR / "demo" / "checkpoints"
DEFAULT_EVAL_TEXT = PACKAGE_DIR / "demo" / "corpus" / "eval.txt"


def env_path(name: str, default: Path | str) -> Path:
    return Path(os.environ.get(name) or default).expanduser().absolute()


def checkpoint_dir() -> Path:
    """Folder with one subfolder per checkpoint (config.json + weights)."""
    return env_path("EDGE_QUANT_CHECKPOINT_DIR", DEMO_CHECKPOINT_DIR)


def recipes_file() -> Path:
    """User recipes, merged with the built-in ones."""
    return env_path("EDGE_QUANT_RECIPES", "recipes.yaml")


ARTIFACT_DIR_VARIABLE = "EDGE_QUANT_ARTIFACT_DIR"
DEFAULT_ARTIFACT_DIR = "artifacts"


def work_dir() -> Path:
    """Intermediate .tflite files and float reference logits."""
    return env_path("EDGE_QUANT_WORK_DIR", ".edge_quant/work")


def eval_text() -> Path:
    return env_path("EDGE_QUANT_EVAL_TEXT", DEFAULT_EVAL_TEXT)


def exporter() -> str:
    """Which litert-torch exporter makes the float .tflite: auto, generative_api or export_hf (exporters.py)."""
    return os.environ.get("EDGE_QUANT_EXPORTER") or "auto"


def memory_ledger() -> Path:
    """The memory reservations of the steps running on this machine (``memory.MemoryLedger``): one file
    for every pipeline process of this user, whatever its other settings."""
    return env_path("EDGE_QUANT_MEMORY_LEDGER", Path(tempfile.gettempdir()) / f"edge-quant-memory-{os.getuid()}.json")
