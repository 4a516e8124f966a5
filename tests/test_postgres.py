"""The production profile (deploy/dagster.yaml) on a real PostgreSQL server, and the
executor choices of EDGE_QUANT_EXECUTOR.

The server is a throwaway cluster (initdb + pg_ctl, a free port, a temporary folder)
started for this module. initdb refuses to run as root, so as root (CI) the server
runs as the `postgres` user Debian's package creates. Without PostgreSQL's server
binaries (`apt-get install postgresql`; `.ci/run` installs it) the Postgres tests skip.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy
from conftest import DEMO_MODEL, REPO, metadata

from edge_quant_pipeline import deployment_settings
from edge_quant_pipeline.config import ArtifactStore, PipelineConfig
from edge_quant_pipeline.defs import executor
from edge_quant_pipeline.defs.automation import checkpoint_sensor
from edge_quant_pipeline.graph import CONVERT_JOB

pytestmark = pytest.mark.services

PROFILE = REPO / "deploy" / "dagster.yaml"
URL_VARIABLE = "EDGE_QUANT_POSTGRES_URL"
RECIPES = ["float", "dynamic_int8"]  # two recipes: the whole graph, in a third of the time of seven


def open_instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home))


def sql(query: str) -> list[tuple]:
    engine = sqlalchemy.create_engine(os.environ[URL_VARIABLE])
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sqlalchemy.text(query))]
    finally:
        engine.dispose()


def test_production_profile_loads_as_configured(dagster_home):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    with open_instance(dagster_home) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 2
        assert queue.tag_concurrency_limits == [
            {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
        ]
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_monitoring_enabled and instance.run_retries_max_retries == 1
        assert not instance.telemetry_enabled


@pytest.mark.graph
def test_demo_model_materializes_with_the_instance_in_postgres(dagster_home, demo_checkpoint_dir, tmp_path):
    from edge_quant_pipeline.runs.launch import materialize

    pipeline = PipelineConfig(
        checkpoint_dir=str(demo_checkpoint_dir.parent),
        artifact_store=ArtifactStore(url=str(tmp_path / "artifacts")),
        work_dir=str(tmp_path / "work"),
    )
    with open_instance(dagster_home) as instance:
        # Two worker processes, as `edge-quant run` uses: each opens the instance from its ref.
        summary = materialize(instance, pipeline, [DEMO_MODEL], RECIPES, jobs=2)
    assert summary.failures == 0

    # A new instance on the same database, as the webserver or the daemon would open it.
    with open_instance(dagster_home) as instance:
        runs = instance.get_runs()
        assert sorted(run.job_name for run in runs) == sorted(
            ["resolve_recipe"] * 2
            + ["convert_checkpoint", "report", "report_all_models"]
            + ["quantize_evaluate_publish"] * 2
        )
        assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        for recipe in RECIPES:
            key = str(dg.MultiPartitionKey({"model": DEMO_MODEL, "recipe": recipe}))
            (record,) = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("published_artifact"), asset_partitions=[key]), limit=1
            ).records
            assert (Path(record.asset_materialization.metadata["artifact_path"].value) / "manifest.json").is_file()
    # ...and they are rows of PostgreSQL's own tables.
    assert sql("SELECT status, count(*) FROM runs GROUP BY status") == [("SUCCESS", 7)]
    materialized = sql("SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
    assert len(materialized) == 12  # every asset of the graph
    # the shipped catalog has no static or GPTQ recipe: calibration computed nothing
    with open_instance(dagster_home) as instance:
        assert metadata(instance, "calibration", DEMO_MODEL)["computed"] == "none"


@dg.sensor(
    name=checkpoint_sensor.name,
    job_name=CONVERT_JOB,
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    required_resource_keys={"pipeline"},
)
def checkpoint_sensor_every_second(context: dg.SensorEvaluationContext):
    """The real checkpoint_sensor, ticking every second instead of every 30 s so the test need not wait."""
    return checkpoint_sensor(context)


@dg.definitions
def watched_location() -> dg.Definitions:
    """The code location the daemon ticks in the test: the convert job and the sensor on EDGE_QUANT_CHECKPOINT_DIR."""
    from edge_quant_pipeline.config import pipeline_config_from_env
    from edge_quant_pipeline.definitions import asset_jobs, defs

    return dg.Definitions(
        assets=defs().assets,
        jobs=[job for job in asset_jobs() if job.name == CONVERT_JOB],
        sensors=[checkpoint_sensor_every_second],
        resources={"pipeline": pipeline_config_from_env()},
    )


def daemon_tick(instance: dg.DagsterInstance) -> None:
    """One iteration of the sensor daemon, the code `dagster-daemon run` loops over, on `watched_location`."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._daemon.sensor import execute_sensor_iteration

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name=__name__, attribute="watched_location"), location_name="watched"
    )
    time.sleep(1.05)  # the sensor's minimum interval since the previous tick
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
        for _ in execute_sensor_iteration(workspace, logging.getLogger("sensor-daemon"), None, None):
            pass


def sensor_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name": checkpoint_sensor.name}))


def test_sensor_cursor_and_run_keys_survive_a_postgres_restart(
    postgres, dagster_home, demo_checkpoint_dir, tmp_path, monkeypatch
):
    from dagster._core.scheduler.instigation import InstigatorType

    from edge_quant_pipeline.checkpoints.digest import hash_checkpoint

    watched = tmp_path / "checkpoints"
    shutil.copytree(demo_checkpoint_dir, watched / DEMO_MODEL)
    monkeypatch.setenv("EDGE_QUANT_CHECKPOINT_DIR", str(watched))
    content_hash = hash_checkpoint(watched / DEMO_MODEL)
    run_key_start = f"{DEMO_MODEL}@{content_hash}@"  # then the code versions

    with open_instance(dagster_home) as instance:
        daemon_tick(instance)  # first sight: the folder could still be being written
        assert sensor_runs(instance) == []
        daemon_tick(instance)  # unchanged since: convert it
        (run,) = sensor_runs(instance)
        run_key = run.tags["dagster/run_key"]
        assert run_key.startswith(run_key_start)
        assert run.status == dg.DagsterRunStatus.QUEUED  # the queued run coordinator holds it for the daemon

    server_pid = postgres.pid()
    postgres.pg_ctl("restart")
    assert postgres.pid() != server_pid

    with open_instance(dagster_home) as instance:
        (state,) = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        assert json.loads(state.instigator_data.cursor)[DEMO_MODEL]["content_hash"] == content_hash
        assert instance.has_dynamic_partition("model", DEMO_MODEL)
        daemon_tick(instance)
        assert [r.run_id for r in sensor_runs(instance)] == [run.run_id]  # not launched twice
        latest = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)[0]
        # The sensor, reading the stored cursor, asked for the same checkpoint version again;
        # the daemon found the run key already used and launched nothing.
        assert latest.run_keys == [run_key] and latest.run_ids == []


def executor_config(monkeypatch, choice: str, **env: str) -> dict:
    """The executor config a job of the code location runs with, validated by Dagster, for this environment."""
    from edge_quant_pipeline.definitions import defs

    monkeypatch.setenv(deployment_settings.EXECUTOR_VARIABLE, choice)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loaded = defs()
    chosen = dg.Definitions(
        assets=loaded.assets, jobs=loaded.jobs, resources=loaded.resources, executor=executor.executor_from_env()
    )
    dg.Definitions.validate_loadable(chosen)
    job = chosen.resolve_job_def("quantize_evaluate_publish")
    return dg.validate_run_config(job, {})["execution"]


def test_in_process_is_the_default(monkeypatch):
    monkeypatch.delenv(deployment_settings.EXECUTOR_VARIABLE, raising=False)
    assert executor.executor_from_env() is dg.in_process_executor
    assert set(executor_config(monkeypatch, "in_process")) == {"in_process"}


def test_multiprocess_runs_as_many_steps_as_fit_in_memory(monkeypatch):
    assert executor.max_concurrent_steps(step_mb=1536, memory_mb=4096, cores=8) == 2  # memory-bound
    assert executor.max_concurrent_steps(step_mb=1536, memory_mb=65536, cores=2) == 2  # core-bound
    assert executor.max_concurrent_steps(step_mb=4096, memory_mb=2048, cores=4) == 1  # never zero
    huge = executor_config(monkeypatch, "multiprocess", EDGE_QUANT_STEP_MEMORY_MB=str(10**9))
    assert huge["multiprocess"]["max_concurrent"] == 1
    tiny = executor_config(monkeypatch, "multiprocess", EDGE_QUANT_STEP_MEMORY_MB="1")
    assert tiny["multiprocess"]["max_concurrent"] == os.cpu_count()


def test_k8s_step_pods_request_the_step_memory(monkeypatch):
    """The Kubernetes Job dagster-k8s would create for each step, built from the validated config."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    monkeypatch.setenv("EDGE_QUANT_POSTGRES_URL", "postgresql+psycopg2://dagster:secret@db:5432/dagster")
    store = {"EDGE_QUANT_WORK_STORE": "s3://bucket/work", "EDGE_QUANT_ARTIFACT_DIR": "s3://bucket/artifacts"}
    config = executor_config(
        monkeypatch, "k8s", EDGE_QUANT_STEP_MEMORY_MB="3000", EDGE_QUANT_K8S_SECRET="edge-quant-store", **store
    )["k8s"]

    def step_container(step: str):
        # The merge K8sStepHandler applies: the executor's config for every step, then the step's own.
        merged = K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(config["step_k8s_config"]))
        own = UserDefinedDagsterK8sConfig.from_dict(config["per_step_k8s_config"].get(step, {}))
        job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image="edge-quant:test", dagster_home="/opt/dagster/home"),
            args=["dagster", "api", "execute_step"],
            job_name=f"dagster-step-{step}",
            user_defined_k8s_config=merged.merge(K8sContainerContext(run_k8s_config=own)).run_k8s_config,
        )
        return job.spec.template.spec.containers[0]

    def step_resources(step: str) -> dict:
        resources = step_container(step).resources
        return {"requests": resources.requests, "limits": resources.limits}

    for step in ("float_tflite", "quantized_tflite", "evaluation"):
        assert step_resources(step) == {"requests": {"cpu": "1", "memory": "3000Mi"}, "limits": {"memory": "3000Mi"}}
    for step in ("quant_recipe", "published_artifact", "quantization_report"):
        assert step_resources(step) == {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}
    # Every step pod reads the run's stores from its environment, and its credentials from the Secret only.
    for step in ("float_tflite", "published_artifact"):
        container = step_container(step)
        env = {e.name: e.value for e in container.env}
        assert {k: env.get(k) for k in store} == store and "EDGE_QUANT_POSTGRES_URL" not in env
        assert ":secret@" not in str(container.env)
        assert [source.secret_ref.name for source in container.env_from] == ["edge-quant-store"]


def test_definitions_module_takes_the_executor_from_the_environment():
    load = "from edge_quant_pipeline.definitions import defs; print(defs().resolve_job_def('report').executor_def.name)"

    def import_with(choice: str) -> subprocess.CompletedProcess:
        env = {**os.environ, deployment_settings.EXECUTOR_VARIABLE: choice}
        return subprocess.run([sys.executable, "-c", load], env=env, capture_output=True, text=True, cwd=REPO)

    assert import_with("k8s").stdout.strip() == "k8s"
    assert import_with("celery").stdout.strip() == "celery"
    unknown = import_with("kubernetes")
    assert unknown.returncode != 0
    assert (
        "EDGE_QUANT_EXECUTOR='kubernetes' is not an executor; use one of: in_process, multiprocess, k8s, celery"
        in unknown.stderr
    )


def test_celery_steps_go_to_the_broker_the_workers_listen_to(monkeypatch):
    from edge_quant_pipeline import celery_app

    config = executor_config(monkeypatch, "celery", EDGE_QUANT_CELERY_BROKER="redis://redis.internal:6379/1")["celery"]
    assert config["broker"] == config["backend"] == "redis://redis.internal:6379/1"
    monkeypatch.setenv(deployment_settings.CELERY_BROKER_VARIABLE, "amqp://guest@rabbit//")
    with pytest.raises(ValueError, match="EDGE_QUANT_CELERY_BROKER='amqp://guest@rabbit//' is not a Redis URL"):
        deployment_settings.celery_broker()
    # The workers' app: one step per process, taken only when idle.
    assert celery_app.app.conf.worker_max_tasks_per_child == 1 and celery_app.app.conf.worker_prefetch_multiplier == 1


def test_bad_step_memory_is_refused_with_the_variable_named(monkeypatch):
    monkeypatch.setenv(deployment_settings.STEP_MEMORY_VARIABLE, "2GB")
    with pytest.raises(ValueError, match="EDGE_QUANT_STEP_MEMORY_MB='2GB': expected a positive whole number"):
        deployment_settings.step_memory_mb()
