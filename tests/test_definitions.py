"""The code location as Dagster loads it: definitions, instance config, unattended parts."""

import dagster as dg
from conftest import REPO


def test_definitions_load():
    from edge_quant_pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs())


def test_sensors_and_schedules_ship_running():
    from edge_quant_pipeline.definitions import defs

    repo = defs().get_repository_def()
    sensors = {s.name: s.default_status for s in repo.sensor_defs}
    assert sensors == {
        name: dg.DefaultSensorStatus.RUNNING for name in ("checkpoint_sensor", "recipe_sensor", "downstream_automation")
    }
    assert {s.name for s in repo.schedule_defs} == {
        "nightly_convert_checkpoint",
        "nightly_resolve_recipe",
        "nightly_quantize_evaluate_publish",
    }
    assert all(s.default_status == dg.DefaultScheduleStatus.RUNNING for s in repo.schedule_defs)


def test_nightly_cron_and_timezone_are_configurable(monkeypatch):
    from edge_quant_pipeline.defs.automation import nightly_schedules_from_env

    monkeypatch.setenv("EDGE_QUANT_NIGHTLY_CRON", "30 3 * * 1-5")
    monkeypatch.setenv("EDGE_QUANT_NIGHTLY_TIMEZONE", "Europe/Berlin")
    for schedule in nightly_schedules_from_env():
        assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 3 * * 1-5", "Europe/Berlin")


def test_project_dagster_yaml_is_a_valid_instance(tmp_path, monkeypatch):
    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    monkeypatch.chdir(tmp_path)  # its paths are relative to where Dagster starts
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        config = instance.get_concurrency_config()
        assert config.run_queue_config.max_concurrent_runs == 2
        assert config.pool_config.default_pool_limit == 1
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300
        assert not instance.telemetry_enabled
    assert (tmp_path / ".dagster" / "storage").is_dir()


# What each job materializes, and for which partitions: spelled out here so that a change of the graph
# (edge_quant_pipeline/graph.py) shows in review as a change of this literal.
JOBS = {
    "convert_checkpoint": (["calibration", "checkpoint", "float_baseline", "float_reference", "float_tflite"], "model"),
    "resolve_recipe": (["quant_recipe"], "recipe"),
    "quantize_evaluate_publish": (
        ["evaluation", "published_artifact", "quantized_tflite", "resolved_recipe"],
        "model|recipe",
    ),
    "report": (["quantization_report"], "model"),
    "report_all_models": (["all_models_report"], None),
}


def test_each_job_materializes_its_assets_for_its_partitions():
    from edge_quant_pipeline.definitions import defs

    loaded = defs()
    found = {}
    for name in JOBS:
        job = loaded.resolve_job_def(name)
        keys = sorted(key.to_user_string() for key in job.asset_layer.executable_asset_keys)
        partitions = job.partitions_def
        dimensions = (
            "|".join(d.name for d in partitions.partitions_defs)
            if isinstance(partitions, dg.MultiPartitionsDefinition)
            else partitions and partitions.name
        )
        found[name] = (keys, dimensions)
    assert found == JOBS


def test_groups_read_left_to_right_in_graph_order():
    """Every edge of the lineage goes from an asset's group to the same group or a later one, so the UI's global
    lineage draws the groups in graph order."""
    from edge_quant_pipeline.definitions import defs
    from edge_quant_pipeline.graph import STAGES

    order = list(dict.fromkeys(stage.group for stage in STAGES))
    assert order == ["checkpoints", "export", "recipes", "quantize", "evaluate", "publish"]
    graph = defs().resolve_asset_graph()
    group_of = {key: graph.get(key).group_name for key in graph.get_all_asset_keys()}
    for key in graph.get_all_asset_keys():
        for parent in graph.get(key).parent_keys:
            assert order.index(group_of[parent]) <= order.index(group_of[key]), (parent, key)


def test_defs_is_a_leaf_only_definitions_imports():
    """Dagster wiring stays thin and on top: no module outside ``defs/`` but ``definitions.py`` imports it (the
    Celery workers' app, ``edge-quant run``, the domain modules), so it can change without moving what it wires."""
    import ast

    package = REPO / "edge_quant_pipeline"
    importers = []
    for module in package.rglob("*.py"):
        if module.parent.name == "defs" or module.name == "definitions.py":
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if any(name.split(".")[:2] == ["edge_quant_pipeline", "defs"] for name in names):
                importers.append(str(module.relative_to(REPO)))
    assert importers == []
