"""The Celery app of a step worker: ``celery -A edge_quant_pipeline.celery_app worker``.

A worker executes the steps the ``celery`` executor (defs/executor.py) puts on the broker, one fresh process per
step. It loads the code location from its own environment: the same ``EDGE_QUANT_*`` settings as the process that
launched the run, except its own ``EDGE_QUANT_WORK_DIR``, and ``DAGSTER_HOME`` need not be set (a step opens the
run's instance from the reference the run sends along).
"""

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from edge_quant_pipeline.celery_config import celery_settings

app = make_app(CeleryExecutor.for_cli(**celery_settings()).app_args())
execute_plan = create_task(app)
