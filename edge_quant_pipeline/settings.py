"""Defaults and environment variables: the knobs a user sets without touching code.

Every ``EDGE_QUANT_*`` variable has a reader that checks its value: here those of what the pipeline makes (its
folders and stores, the export and evaluation settings), in ``deployment_settings.py`` those of how runs execute;
``SETTINGS`` lists them all. ``check()`` runs them all when `edge-quant run` starts and when the code location
loads, so that a bad value is found before any work, as one line naming the variable, the value and the fix
(``setting_values.py``).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edge_quant_pipeline.deployment_settings import (
    CELERY_BROKER_VARIABLE,
    EXECUTOR_VARIABLE,
    K8S_SECRET_VARIABLE,
    STEP_MEMORY_VARIABLE,
    celery_broker,
    executor,
    k8s_secret,
    memory_ledger,
    nightly_cron,
    nightly_rebuild_all,
    nightly_timezone,
    postgres_url,
    step_memory_mb,
)
from edge_quant_pipeline.setting_values import SettingError, env_path, folder, shown, switch, whole_number
from edge_quant_pipeline.shapes import ExportSettings

PACKAGE_DIR = Path(__file__).parent
DEMO_CHECKPOINT_DIR = PACKAGE_DIR / "demo" / "checkpoints"
DEFAULT_EVAL_TEXT = PACKAGE_DIR / "demo" / "corpus" / "eval.txt"
# Calibration (static activation ranges, GPTQ) reads text the evaluation does not: the demo's training prose.
DEFAULT_CALIBRATION_TEXT = PACKAGE_DIR / "demo" / "corpus" / "train.txt"

ARTIFACT_DIR_VARIABLE = "EDGE_QUANT_ARTIFACT_DIR"
WORK_DIR_VARIABLE = "EDGE_QUANT_WORK_DIR"
WORK_STORE_VARIABLE = "EDGE_QUANT_WORK_STORE"
WORK_CACHE_VARIABLE = "EDGE_QUANT_WORK_CACHE_GB"
DEFAULT_WORK_CACHE_GB = 20.0
DEFAULT_ARTIFACT_DIR = "artifacts"
KEEP_VERSIONS_VARIABLE = "EDGE_QUANT_KEEP_VERSIONS"
DEFAULT_KEEP_VERSIONS = 5  # per (model, recipe), besides those latest.json and champion.json name; 0: every one
# What shapes the float export and every evaluation (the `pipeline` resource's defaults too).
DEFAULT_EVAL_MAX_TOKENS = 2048  # of the eval text, cut into windows of kv_cache_len tokens
DEFAULT_INTERPRETER_THREADS = 2
DEFAULT_HOTSPOTS_TOP_N = 10
DEFAULT_CALIBRATION_SAMPLES = 16
# lm-eval tasks every recipe is scored on in LiteRT-LM (evaluate/tasks.py): the demo's two, built from its held-out
# text, until a user names others; at most this many samples each.
DEFAULT_TASKS = ("demo_cloze", "demo_completion")
DEFAULT_TASK_LIMIT = 100


# litert-torch's two exporters (export/exporters.py), and `auto`, which picks one per checkpoint.
GENERATIVE_API, EXPORT_HF, AUTO = "generative_api", "export_hf", "auto"
EXPORTER_CHOICES = (AUTO, GENERATIVE_API, EXPORT_HF)


class ExporterSettingError(SettingError):
    """The exporter setting names no exporter."""


def checked_exporter(exporter: str) -> str:
    """``exporter`` if it names one (the environment's setting, or the pipeline resource's)."""
    if exporter not in EXPORTER_CHOICES:
        raise ExporterSettingError(
            f"EDGE_QUANT_EXPORTER={exporter!r} names no exporter; use one of {', '.join(EXPORTER_CHOICES)}."
        )
    return exporter


def checkpoint_dir() -> Path:
    """Folder with one subfolder per checkpoint (config.json + weights)."""
    return folder(
        "EDGE_QUANT_CHECKPOINT_DIR",
        DEMO_CHECKPOINT_DIR,
        "set it to the folder that holds one subfolder per checkpoint",
        must_exist=True,
    )


def recipes_file() -> Path:
    """User recipes, merged with the built-in ones; without the default file, the built-in ones alone."""
    name, path = "EDGE_QUANT_RECIPES", env_path("EDGE_QUANT_RECIPES", "recipes.yaml")
    if path.is_dir() or (os.environ.get(name) and not path.exists()):  # set by hand: a typo, not "no recipes"
        problem = f"{path} is a folder" if path.is_dir() else f"no file {path}"
        raise SettingError(
            f"{shown(name, 'recipes.yaml')}: {problem}; set it to your recipes.yaml, or unset it for "
            "./recipes.yaml (the built-in recipes alone when there is none)."
        )
    return path


def _store_url(name: str, default: str) -> str:
    """A local folder, or a URL of a filesystem fsspec has installed (``s3://...``)."""
    url = os.environ.get(name) or default
    protocol = url.split("://", 1)[0] if "://" in url else ""
    if not protocol:
        folder(name, default, "set it to a folder or a URL", must_exist=False)
        return url
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:  # a package missing (s3fs, gcsfs, ...), or no such protocol
        raise SettingError(
            f"{shown(name, default)}: fsspec cannot open {protocol}:// ({error}); install its filesystem package "
            "(the s3 extra: s3fs), or use a local folder."
        ) from None
    return url


def artifact_dir() -> str:
    """The artifact store: a local folder, or a URL of a filesystem fsspec has installed (``s3://...``)."""
    return _store_url(ARTIFACT_DIR_VARIABLE, DEFAULT_ARTIFACT_DIR)


def work_store() -> str | None:
    """Where intermediates cross between steps that share no disk (workstore.py); None: the work folder."""
    return _store_url(WORK_STORE_VARIABLE, "") if os.environ.get(WORK_STORE_VARIABLE) else None


def work_cache_gb() -> float:
    """With a work store: how much of it a work folder keeps (least recently used copies go first)."""
    value = os.environ.get(WORK_CACHE_VARIABLE) or str(DEFAULT_WORK_CACHE_GB)
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes > 0:
        raise SettingError(
            f"{WORK_CACHE_VARIABLE}={value!r} is not a positive number of gigabytes; set it to what the work "
            f"folder may keep of the work store (default {DEFAULT_WORK_CACHE_GB})."
        )
    return gigabytes


def work_dir() -> Path:
    """Intermediate .tflite files and float reference logits."""
    return folder(WORK_DIR_VARIABLE, ".edge_quant/work", "set it to a folder for work files", must_exist=False)


def _text_file(name: str, default: Path, what: str) -> Path:
    path = env_path(name, default)
    if not path.is_file() or not os.access(path, os.R_OK):
        problem = "not a readable file" if path.exists() else "no such file"
        raise SettingError(
            f"{shown(name, default)}: {problem} ({path}); set it to a UTF-8 text file of {what}, or unset it for "
            "the demo's."
        )
    return path


def eval_text() -> Path:
    return _text_file("EDGE_QUANT_EVAL_TEXT", DEFAULT_EVAL_TEXT, "held-out text")


def calibration_text() -> Path:
    """What static activation ranges and GPTQ are calibrated on: text like the model's inputs, not the eval text."""
    return _text_file("EDGE_QUANT_CALIBRATION_TEXT", DEFAULT_CALIBRATION_TEXT, "calibration text")


def exporter() -> str:
    """Which litert-torch exporter makes the float .tflite: auto, generative_api or export_hf (export/exporters.py)."""
    return checked_exporter(os.environ.get("EDGE_QUANT_EXPORTER") or AUTO)


def keep_versions() -> int:
    """How many versions of each (model, recipe) the store keeps, newest first (publish/retention.py); 0: all."""
    return whole_number(
        KEEP_VERSIONS_VARIABLE,
        DEFAULT_KEEP_VERSIONS,
        "the versions of each (model, recipe) the store keeps besides the latest and the champion; 0 keeps every one",
        minimum=0,
    )


def prefill_len() -> int:
    return whole_number("EDGE_QUANT_PREFILL_LEN", ExportSettings.prefill_len, "the tokens one prefill call takes")


def kv_cache_len() -> int:
    """The KV cache length baked into the export; each evaluation and calibration window is this long."""
    length = whole_number("EDGE_QUANT_KV_CACHE_LEN", ExportSettings.kv_cache_len, "the KV cache's length")
    if length < prefill_len():
        raise SettingError(
            f"{shown('EDGE_QUANT_KV_CACHE_LEN', ExportSettings.kv_cache_len)}: shorter than the prefill length "
            f"({prefill_len()}); make it at least that."
        )
    return length


def eval_max_tokens() -> int:
    return whole_number("EDGE_QUANT_EVAL_MAX_TOKENS", DEFAULT_EVAL_MAX_TOKENS, "the eval text's tokens scored")


def interpreter_threads() -> int:
    return whole_number("EDGE_QUANT_INTERPRETER_THREADS", DEFAULT_INTERPRETER_THREADS, "threads per interpreter")


def hotspots_top_n() -> int:
    return whole_number("EDGE_QUANT_HOTSPOTS_TOP_N", DEFAULT_HOTSPOTS_TOP_N, "the error hotspots reported", 0)


def tasks() -> list[str]:
    """lm-eval tasks scored in LiteRT-LM: registry names, YAML files or folders of them, or the demo's; ``none``
    scores none. A name that looks like a path must be one."""
    name = "EDGE_QUANT_TASKS"
    value = os.environ.get(name)
    if value is None or value == "":
        return list(DEFAULT_TASKS)
    chosen = [task.strip() for task in value.split(",") if task.strip() and task.strip().lower() != "none"]
    for task in chosen:
        if ("/" in task or task.endswith((".yaml", ".yml"))) and not Path(task).expanduser().exists():
            raise SettingError(
                f"{name}={value!r}: no task file or folder {task}; name lm-eval tasks (hellaswag, arc_easy), YAML "
                f"files or folders of them, or the demo's ({', '.join(DEFAULT_TASKS)}), separated by commas."
            )
    return [str(Path(t).expanduser().absolute()) if Path(t).expanduser().exists() else t for t in chosen]


def task_limit() -> int:
    return whole_number("EDGE_QUANT_TASK_LIMIT", DEFAULT_TASK_LIMIT, "samples per task, 0 for all", 0)


def calibration_samples() -> int:
    return whole_number(
        "EDGE_QUANT_CALIBRATION_SAMPLES", DEFAULT_CALIBRATION_SAMPLES, "calibration windows of kv_cache_len tokens"
    )


def localize_errors() -> bool:
    return switch("EDGE_QUANT_LOCALIZE_ERRORS", True, "per-tensor error localisation of each evaluation")


# Every variable and the reader that checks it.
SETTINGS = {
    "EDGE_QUANT_CHECKPOINT_DIR": checkpoint_dir,
    "EDGE_QUANT_RECIPES": recipes_file,
    ARTIFACT_DIR_VARIABLE: artifact_dir,
    KEEP_VERSIONS_VARIABLE: keep_versions,
    WORK_DIR_VARIABLE: work_dir,
    WORK_STORE_VARIABLE: work_store,
    WORK_CACHE_VARIABLE: work_cache_gb,
    "EDGE_QUANT_EVAL_TEXT": eval_text,
    "EDGE_QUANT_EVAL_MAX_TOKENS": eval_max_tokens,
    "EDGE_QUANT_PREFILL_LEN": prefill_len,
    "EDGE_QUANT_KV_CACHE_LEN": kv_cache_len,
    "EDGE_QUANT_INTERPRETER_THREADS": interpreter_threads,
    "EDGE_QUANT_LOCALIZE_ERRORS": localize_errors,
    "EDGE_QUANT_HOTSPOTS_TOP_N": hotspots_top_n,
    "EDGE_QUANT_TASKS": tasks,
    "EDGE_QUANT_TASK_LIMIT": task_limit,
    "EDGE_QUANT_CALIBRATION_TEXT": calibration_text,
    "EDGE_QUANT_CALIBRATION_SAMPLES": calibration_samples,
    "EDGE_QUANT_EXPORTER": exporter,
    "EDGE_QUANT_MEMORY_LEDGER": memory_ledger,
    EXECUTOR_VARIABLE: executor,
    STEP_MEMORY_VARIABLE: step_memory_mb,
    CELERY_BROKER_VARIABLE: celery_broker,
    K8S_SECRET_VARIABLE: k8s_secret,
    "EDGE_QUANT_NIGHTLY_CRON": nightly_cron,
    "EDGE_QUANT_NIGHTLY_TIMEZONE": nightly_timezone,
    "EDGE_QUANT_NIGHTLY_REBUILD_ALL": nightly_rebuild_all,
    "EDGE_QUANT_POSTGRES_URL": postgres_url,
}


def _unknown_variables() -> list[str]:
    """A misspelt variable would otherwise be ignored without a word, and its default used."""
    return [
        f"{name}={os.environ[name]!r} is not a setting of this pipeline; "
        + "".join(f"did you mean {match}? " for match in difflib.get_close_matches(name, SETTINGS, n=1))
        + f"Its settings: {', '.join(SETTINGS)}."
        for name in sorted(os.environ)
        if name.startswith("EDGE_QUANT_") and name not in SETTINGS
    ]


@dataclass(frozen=True)
class Setting:
    name: str
    value: str  # as the pipeline reads it (a password hidden), or the problem with it
    source: str  # environment | default | problem


def described() -> list[Setting]:
    """Every setting, its value as the pipeline reads it and where that value came from (``edge-quant settings``)."""
    rows = []
    for name, read in SETTINGS.items():
        try:
            value = read()
        except SettingError as error:
            rows.append(Setting(name, str(error), "problem"))
            continue
        shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(value)) if value is not None else ""
        rows.append(Setting(name, shown, "environment" if os.environ.get(name) else "default"))
    return rows


def check() -> None:
    """Every ``EDGE_QUANT_*`` setting, read and checked at once: a SettingError with one line per bad one."""
    problems = _unknown_variables()
    for read in SETTINGS.values():
        try:
            read()
        except SettingError as error:
            problems.append(str(error))
    if problems:
        raise SettingError("\n".join(problems))
