"""The executor the code location's jobs run with, chosen by ``EDGE_QUANT_EXECUTOR``.

- ``in_process`` (default): every step of a run in the run's own process. For small
  models the import of torch + TensorFlow + litert-torch (~7 s, 1.1 GB) costs more
  than the work; a conversion run of the demo model peaks at 1.34 GB this way.
- ``multiprocess``: Dagster's ``multiprocess_executor``, one process per step, as many
  at once as fit in this machine's memory (``EDGE_QUANT_STEP_MEMORY_MB`` each) and at
  most one per core.
- ``k8s``: dagster-k8s's ``k8s_job_executor``, one Kubernetes Job per step, each
  requesting ``EDGE_QUANT_STEP_MEMORY_MB`` (steps that hold no model: 512 MB), with the
  run's ``EDGE_QUANT_*`` settings and the Secret ``EDGE_QUANT_K8S_SECRET`` as environment.
  Image and namespace come from the instance's ``K8sRunLauncher``.
- ``celery``: dagster-celery's executor, every step a task on the Redis broker
  ``EDGE_QUANT_CELERY_BROKER``, run by whichever worker takes it
  (``celery -A edge_quant_pipeline.celery_app worker``), each step in a fresh process.

Steps on other machines need ``EDGE_QUANT_WORK_STORE`` (workstore.py), or a volume they all
mount at the same path. ``edge-quant run`` executes runs in process, except with ``celery``:
then its runs only orchestrate, and their steps go to the workers.
"""

import os
from collections.abc import Callable

import dagster as dg

from edge_quant_pipeline import deployment_settings
from edge_quant_pipeline.celery_config import celery_settings
from edge_quant_pipeline.graph import LIGHT_STEPS

# What the steps that never hold a model request on Kubernetes.
LIGHT_STEP_MEMORY_MB = 512


def machine_memory_mb() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20


def max_concurrent_steps(step_mb: int, memory_mb: int, cores: int) -> int:
    """Step processes one run may hold at once: as many as fit in memory, at most one per core (steps are CPU-bound)."""
    return max(1, min(cores, memory_mb // step_mb))


def multiprocess() -> dg.ExecutorDefinition:
    limit = max_concurrent_steps(deployment_settings.step_memory_mb(), machine_memory_mb(), os.cpu_count() or 1)
    return dg.multiprocess_executor.configured({"max_concurrent": limit}, name="multiprocess")


def k8s_resources(memory_mb: int) -> dict:
    # Request the step's peak and limit memory to it, so pods are placed by what they
    # really use and one runaway step cannot starve its node. One core: a conversion
    # run of the demo model, export included, averaged under one (38 CPU-s in 48 s).
    return {
        "container_config": {
            "resources": {
                "requests": {"cpu": "1", "memory": f"{memory_mb}Mi"},
                "limits": {"memory": f"{memory_mb}Mi"},
            }
        }
    }


def k8s_environment() -> dict:
    """A step pod's environment: this run's pipeline settings (a step reads the same ones, the work store first of
    all), and from the Secret EDGE_QUANT_K8S_SECRET names, the credentials (the store's, the database URL), which
    are never written into a Job spec."""
    passed = [
        {"name": name, "value": value}
        for name, value in sorted(os.environ.items())
        if name.startswith("EDGE_QUANT_") and name not in deployment_settings.SECRET_SETTINGS
    ]
    secret = deployment_settings.k8s_secret()
    return {"env": passed, "env_from": [{"secret_ref": {"name": secret}}] if secret else []}


def k8s() -> dg.ExecutorDefinition:
    from dagster_k8s import k8s_job_executor  # the `k8s` extra; only this choice needs it

    step_config = k8s_resources(deployment_settings.step_memory_mb())
    step_config["container_config"] |= k8s_environment()
    return k8s_job_executor.configured(
        {
            "step_k8s_config": step_config,
            "per_step_k8s_config": {step: k8s_resources(LIGHT_STEP_MEMORY_MB) for step in LIGHT_STEPS},
        },
        name="k8s",
    )


def celery() -> dg.ExecutorDefinition:
    from dagster_celery import celery_executor  # the `celery` extra; only this choice needs it

    return celery_executor.configured(celery_settings(), name="celery")


EXECUTORS: dict[str, Callable[[], dg.ExecutorDefinition]] = {
    "in_process": lambda: dg.in_process_executor,
    "multiprocess": multiprocess,
    "k8s": k8s,
    "celery": celery,
}


def executor_from_env() -> dg.ExecutorDefinition:
    return EXECUTORS[deployment_settings.executor()]()
