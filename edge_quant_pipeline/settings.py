"""Defaults and environment variables: the knobs a user sets without touching code.

Every ``EDGE_QUANT_*`` variable is read here, and each reader checks its value. ``check()`` runs them all when
`edge-quant run` starts and when the code location loads, so that a bad value is found before any work, as one
line naming the variable, the value and the fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import tempfile
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

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
EXECUTOR_VARIABLE = "EDGE_QUANT_EXECUTOR"
EXECUTOR_CHOICES = ("in_process", "multiprocess", "k8s", "celery")
DISTRIBUTED_EXECUTORS = ("celery",)  # `edge-quant run` hands their runs' steps to their workers
CELERY_BROKER_VARIABLE = "EDGE_QUANT_CELERY_BROKER"
K8S_SECRET_VARIABLE = "EDGE_QUANT_K8S_SECRET"
# Settings that hold credentials: step pods get them from the Secret, never written into their Job spec.
SECRET_SETTINGS = ("EDGE_QUANT_POSTGRES_URL",)
DEFAULT_CELERY_BROKER = "redis://localhost:6379/0"
STEP_MEMORY_VARIABLE = "EDGE_QUANT_STEP_MEMORY_MB"
# Peak RSS of one step process, demo model, multiprocess executor: float_tflite (the
# export) 1,335 MB, float_reference 1,221 MB, checkpoint 1,184 MB, nearly all of it
# torch + TensorFlow + litert-torch being imported; quantized_tflite and evaluation
# 0.2-0.3 GB, but they hold the model too. 1.5 GB leaves 15% headroom over the
# largest; larger checkpoints need more (the export holds the model a few times over).
DEFAULT_STEP_MEMORY_MB = 1536
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
# What shapes the float export and every evaluation (the `pipeline` resource's defaults too).
DEFAULT_EVAL_MAX_TOKENS = 2048  # of the eval text, cut into windows of kv_cache_len tokens
DEFAULT_INTERPRETER_THREADS = 2
DEFAULT_HOTSPOTS_TOP_N = 10
DEFAULT_CALIBRATION_SAMPLES = 16
# lm-eval tasks every recipe is scored on in LiteRT-LM (evaluate/tasks.py): the demo's two, built from its held-out
# text, until a user names others; at most this many samples each.
DEFAULT_TASKS = ("demo_cloze", "demo_completion")
DEFAULT_TASK_LIMIT = 100


class SettingError(ValueError):
    """An ``EDGE_QUANT_*`` variable the pipeline cannot use; the message names it, its value and the fix.
    Several at once come one per line."""


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


def _shown(name: str, default: object) -> str:
    value = os.environ.get(name)
    return f"{name}={value!r}" if value else f"{name} (not set, so {str(default)!r})"


def env_path(name: str, default: Path | str) -> Path:
    return Path(os.environ.get(name) or default).expanduser().absolute()


def _folder(name: str, default: Path | str, fix: str, must_exist: bool) -> Path:
    path = env_path(name, default)
    if path.exists() and not path.is_dir():
        raise SettingError(f"{_shown(name, default)}: {path} is not a folder; {fix}.")
    if must_exist and not path.exists():
        raise SettingError(f"{_shown(name, default)}: no folder {path}; {fix}.")
    return path


def checkpoint_dir() -> Path:
    """Folder with one subfolder per checkpoint (config.json + weights)."""
    return _folder(
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
            f"{_shown(name, 'recipes.yaml')}: {problem}; set it to your recipes.yaml, or unset it for "
            "./recipes.yaml (the built-in recipes alone when there is none)."
        )
    return path


def _store_url(name: str, default: str) -> str:
    """A local folder, or a URL of a filesystem fsspec has installed (``s3://...``)."""
    url = os.environ.get(name) or default
    protocol = url.split("://", 1)[0] if "://" in url else ""
    if not protocol:
        _folder(name, default, "set it to a folder or a URL", must_exist=False)
        return url
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:  # a package missing (s3fs, gcsfs, ...), or no such protocol
        raise SettingError(
            f"{_shown(name, default)}: fsspec cannot open {protocol}:// ({error}); install its filesystem package "
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
    return _folder(WORK_DIR_VARIABLE, ".edge_quant/work", "set it to a folder for work files", must_exist=False)


def _text_file(name: str, default: Path, what: str) -> Path:
    path = env_path(name, default)
    if not path.is_file() or not os.access(path, os.R_OK):
        problem = "not a readable file" if path.exists() else "no such file"
        raise SettingError(
            f"{_shown(name, default)}: {problem} ({path}); set it to a UTF-8 text file of {what}, or unset it for "
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


def memory_ledger() -> Path:
    """The memory reservations of the steps running on this machine (``memory.MemoryLedger``): one file
    for every pipeline process of this user, whatever its other settings."""
    name = "EDGE_QUANT_MEMORY_LEDGER"
    default = Path(tempfile.gettempdir()) / f"edge-quant-memory-{os.getuid()}.json"
    path = env_path(name, default)
    if path.is_dir() or not path.parent.is_dir():
        problem = f"{path} is a folder" if path.is_dir() else f"no folder {path.parent}"
        raise SettingError(
            f"{_shown(name, default)}: {problem}; set it to a file in an existing folder, the same for every "
            "pipeline process on this machine."
        )
    return path


def executor() -> str:
    """How runs the daemon or the UI launch execute their steps (``defs/executor.py``)."""
    choice = os.environ.get(EXECUTOR_VARIABLE) or "in_process"
    if choice not in EXECUTOR_CHOICES:
        raise SettingError(
            f"{EXECUTOR_VARIABLE}={choice!r} is not an executor; use one of: {', '.join(EXECUTOR_CHOICES)}."
        )
    for extra, package in (("k8s", "dagster_k8s"), ("celery", "dagster_celery")):
        if choice == extra and importlib.util.find_spec(package) is None:
            raise SettingError(
                f"{EXECUTOR_VARIABLE}={extra!r} needs {package.replace('_', '-')}; install it: pip install -e "
                f"'.[{extra}]'."
            )
    return choice


def k8s_secret() -> str | None:
    """The Kubernetes Secret step pods take their credentials from (object store keys, EDGE_QUANT_POSTGRES_URL)."""
    name = os.environ.get(K8S_SECRET_VARIABLE)
    if name and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
        raise SettingError(
            f"{K8S_SECRET_VARIABLE}={name!r} is not a Kubernetes Secret name; use lower-case letters, digits, '-' "
            "and '.', e.g. edge-quant-store."
        )
    return name or None


def celery_broker() -> str:
    """The Celery executor's broker and result backend (a Redis URL), which its workers listen to."""
    url = os.environ.get(CELERY_BROKER_VARIABLE) or DEFAULT_CELERY_BROKER
    if not re.fullmatch(r"rediss?://[^\s]+", url):
        raise SettingError(
            f"{_shown(CELERY_BROKER_VARIABLE, DEFAULT_CELERY_BROKER)} is not a Redis URL; set it to the broker the "
            "Celery workers listen to, e.g. redis://redis.internal:6379/0."
        )
    return url


def _whole_number(name: str, default: int, what: str, minimum: int = 1) -> int:
    value = os.environ.get(name) or str(default)
    if not value.isdigit() or int(value) < minimum:
        raise SettingError(f"{_shown(name, default)}: expected a whole number of at least {minimum}: {what}.")
    return int(value)


def keep_versions() -> int:
    """How many versions of each (model, recipe) the store keeps, newest first (publish/retention.py); 0: all."""
    return _whole_number(
        KEEP_VERSIONS_VARIABLE,
        DEFAULT_KEEP_VERSIONS,
        "the versions of each (model, recipe) the store keeps besides the latest and the champion; 0 keeps every one",
        minimum=0,
    )


def prefill_len() -> int:
    return _whole_number("EDGE_QUANT_PREFILL_LEN", ExportSettings.prefill_len, "the tokens one prefill call takes")


def kv_cache_len() -> int:
    """The KV cache length baked into the export; each evaluation and calibration window is this long."""
    length = _whole_number("EDGE_QUANT_KV_CACHE_LEN", ExportSettings.kv_cache_len, "the KV cache's length")
    if length < prefill_len():
        raise SettingError(
            f"{_shown('EDGE_QUANT_KV_CACHE_LEN', ExportSettings.kv_cache_len)}: shorter than the prefill length "
            f"({prefill_len()}); make it at least that."
        )
    return length


def eval_max_tokens() -> int:
    return _whole_number("EDGE_QUANT_EVAL_MAX_TOKENS", DEFAULT_EVAL_MAX_TOKENS, "the eval text's tokens scored")


def interpreter_threads() -> int:
    return _whole_number("EDGE_QUANT_INTERPRETER_THREADS", DEFAULT_INTERPRETER_THREADS, "threads per interpreter")


def hotspots_top_n() -> int:
    return _whole_number("EDGE_QUANT_HOTSPOTS_TOP_N", DEFAULT_HOTSPOTS_TOP_N, "the error hotspots reported", 0)


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
    return _whole_number("EDGE_QUANT_TASK_LIMIT", DEFAULT_TASK_LIMIT, "samples per task, 0 for all", 0)


def calibration_samples() -> int:
    return _whole_number(
        "EDGE_QUANT_CALIBRATION_SAMPLES", DEFAULT_CALIBRATION_SAMPLES, "calibration windows of kv_cache_len tokens"
    )


def _switch(name: str, default: bool, what: str) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() not in _TRUE + _FALSE:
        raise SettingError(
            f"{name}={value!r} is neither on nor off; use 1, true, yes or on, or 0, false, no or off ({what})."
        )
    return value.lower() in _TRUE


def localize_errors() -> bool:
    return _switch("EDGE_QUANT_LOCALIZE_ERRORS", True, "per-tensor error localisation of each evaluation")


def step_memory_mb() -> int:
    value = os.environ.get(STEP_MEMORY_VARIABLE) or str(DEFAULT_STEP_MEMORY_MB)
    if not value.isdigit() or int(value) == 0:
        raise SettingError(f"{STEP_MEMORY_VARIABLE}={value!r}: expected a positive whole number of megabytes.")
    return int(value)


def nightly_cron() -> str:
    # Dagster's own test of a schedule's cron string, so that what passes here loads as a schedule.
    from dagster._utils.schedules import is_valid_cron_string

    cron = os.environ.get("EDGE_QUANT_NIGHTLY_CRON") or "0 2 * * *"
    if not is_valid_cron_string(cron):
        raise SettingError(
            f"EDGE_QUANT_NIGHTLY_CRON={cron!r} is not a cron schedule; give five fields, minute hour day month "
            "weekday, for example '0 2 * * *' (02:00 every day)."
        )
    return cron


def nightly_timezone() -> str:
    timezone = os.environ.get("EDGE_QUANT_NIGHTLY_TIMEZONE") or "UTC"
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SettingError(
            f"EDGE_QUANT_NIGHTLY_TIMEZONE={timezone!r} is not a time zone; use an IANA name such as 'UTC' or "
            "'Europe/Berlin'."
        ) from None
    return timezone


def nightly_rebuild_all() -> bool:
    return _switch("EDGE_QUANT_NIGHTLY_REBUILD_ALL", False, "rebuild everything nightly, or only what changed")


def postgres_url() -> str | None:
    """The production profile's database (``deploy/dagster.yaml`` reads it; Dagster connects with SQLAlchemy)."""
    url = os.environ.get("EDGE_QUANT_POSTGRES_URL")
    if not url:
        return None
    from sqlalchemy.engine import make_url

    shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)  # the password stays out of messages
    try:
        make_url(url).get_dialect().import_dbapi()
    except Exception as error:  # not a URL (ArgumentError), an unknown dialect or a driver not installed
        raise SettingError(
            f"EDGE_QUANT_POSTGRES_URL={shown!r} cannot be used ({type(error).__name__}: {error}); spell the driver "
            "that the postgres extra installs (pip install -e '.[postgres]'): "
            "postgresql+psycopg2://user:password@host:5432/database."
        ) from None
    return url


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
