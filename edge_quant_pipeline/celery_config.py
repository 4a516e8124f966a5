"""The Celery executor's config, which both sides read: the ``celery`` executor that puts steps on the broker
(``defs/executor.py``) and the workers' app that takes them (``celery_app.py``), so that both name one broker."""

from edge_quant_pipeline import deployment_settings

# What a Celery worker process does: one step, then it exits (torch and the model go with it, as with a k8s Job);
# it takes a step only when it has none (prefetch 1), so two workers share the steps of a run.
CELERY_WORKER_SETTINGS = {"worker_max_tasks_per_child": 1, "worker_prefetch_multiplier": 1}


def celery_settings() -> dict:
    broker = deployment_settings.celery_broker()
    return {"broker": broker, "backend": broker, "config_source": CELERY_WORKER_SETTINGS}
