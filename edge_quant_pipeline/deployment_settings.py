"""Settings of how and where runs execute, which shape no asset: the executor, its broker and Secret, the memory a
step may take and the ledger of this machine's reservations, the nightly schedule, the production database."""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import zoneinfo
from pathlib import Path

from edge_quant_pipeline.setting_values import SettingError, env_path, shown, switch

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


def memory_ledger() -> Path:
    """The memory reservations of the steps running on this machine (``memory.MemoryLedger``): one file
    for every pipeline process of this user, whatever its other settings."""
    name = "EDGE_QUANT_MEMORY_LEDGER"
    default = Path(tempfile.gettempdir()) / f"edge-quant-memory-{os.getuid()}.json"
    path = env_path(name, default)
    if path.is_dir() or not path.parent.is_dir():
        problem = f"{path} is a folder" if path.is_dir() else f"no folder {path.parent}"
        raise SettingError(
            f"{shown(name, default)}: {problem}; set it to a file in an existing folder, the same for every "
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
            f"{shown(CELERY_BROKER_VARIABLE, DEFAULT_CELERY_BROKER)} is not a Redis URL; set it to the broker the "
            "Celery workers listen to, e.g. redis://redis.internal:6379/0."
        )
    return url


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
    return switch("EDGE_QUANT_NIGHTLY_REBUILD_ALL", False, "rebuild everything nightly, or only what changed")


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
