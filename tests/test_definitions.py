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
