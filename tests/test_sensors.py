"""The checkpoint and recipe sensors, evaluated against a real instance and real folders."""

import json
import shutil

import dagster as dg
import pytest
from conftest import recipe_catalog

from edge_quant_pipeline.config import ArtifactStore, PipelineConfig
from edge_quant_pipeline.defs.automation import checkpoint_sensor, recipe_sensor


@pytest.fixture
def watched(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    return root, PipelineConfig(
        checkpoint_dir=str(root), artifact_store=ArtifactStore(url=str(tmp_path / "a")), work_dir=str(tmp_path / "w")
    )


def tick(instance, pipeline, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"pipeline": pipeline}) as context:
        return checkpoint_sensor(context)


def test_new_checkpoint_waits_until_stable_then_adds_a_partition_and_a_run(watched, demo_checkpoint_dir):
    root, pipeline = watched
    with dg.instance_for_test() as instance:
        empty = tick(instance, pipeline)
        assert empty.run_requests == [] and empty.dynamic_partitions_requests == []

        shutil.copytree(demo_checkpoint_dir, root / "fresh model")
        first = tick(instance, pipeline, empty.cursor)
        assert first.run_requests == []  # just appeared: could still be being written

        second = tick(instance, pipeline, first.cursor)
        (request,) = second.run_requests
        assert request.partition_key == "fresh-model"
        assert request.run_key.startswith("fresh-model@")
        (added,) = second.dynamic_partitions_requests
        assert list(added.partition_keys) == ["fresh-model"]

        # Same version again, e.g. after a restart with the stored cursor: the same run key,
        # which Dagster refuses to launch twice.
        instance.add_dynamic_partitions("model", ["fresh-model"])
        third = tick(instance, pipeline, second.cursor)
        assert [r.run_key for r in third.run_requests] == [request.run_key]
        assert third.dynamic_partitions_requests == []


def test_changed_checkpoint_gets_a_new_run_key(watched, demo_checkpoint_dir):
    root, pipeline = watched
    shutil.copytree(demo_checkpoint_dir, root / "m")
    with dg.instance_for_test() as instance:
        stable = tick(instance, pipeline, tick(instance, pipeline).cursor)
        old_key = stable.run_requests[0].run_key
        weights = root / "m" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        settling = tick(instance, pipeline, stable.cursor)
        assert settling.run_requests == []
        settled = tick(instance, pipeline, settling.cursor)
        assert [r.run_key for r in settled.run_requests] != [old_key]
        assert settled.run_requests[0].partition_key == "m"


def test_folder_without_config_json_is_left_alone(watched, demo_checkpoint_dir):
    root, pipeline = watched
    shutil.copytree(demo_checkpoint_dir, root / "partial")
    (root / "partial" / "config.json").unlink()
    (root / "README.txt").write_text("not a checkpoint")
    with dg.instance_for_test() as instance:
        first = tick(instance, pipeline)
        assert tick(instance, pipeline, first.cursor).run_requests == []


def test_deleted_checkpoint_is_reported_not_crashed_on(watched, demo_checkpoint_dir, capfd):
    root, pipeline = watched
    shutil.copytree(demo_checkpoint_dir, root / "gone")
    with dg.instance_for_test() as instance:
        cursor = tick(instance, pipeline, tick(instance, pipeline).cursor).cursor
        shutil.rmtree(root / "gone")
        result = tick(instance, pipeline, cursor)
        assert result.run_requests == []
        assert json.loads(result.cursor) == {}
    assert "'gone' is gone" in capfd.readouterr().err


def test_missing_folder_is_a_skip_with_the_fix(tmp_path):
    pipeline = PipelineConfig(
        checkpoint_dir=str(tmp_path / "nope"), artifact_store=ArtifactStore(url="a"), work_dir="w"
    )
    with dg.instance_for_test() as instance:
        result = tick(instance, pipeline)
    assert isinstance(result, dg.SkipReason) and "EDGE_QUANT_CHECKPOINT_DIR" in result.skip_message


def test_recipe_sensor_keeps_a_partition_per_recipe_and_keys_each_by_its_spec_and_gates(watched):
    _, pipeline = watched
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("recipe", ["dropped-from-recipes-yaml"])
        with dg.build_sensor_context(instance=instance, resources={"pipeline": pipeline}) as context:
            result = recipe_sensor(context)
    assert {r.partition_key: r.run_key for r in result.run_requests} == {
        name: f"{name}@{recipe.definition_hash}" for name, recipe in recipe_catalog.recipes.items()
    }
    added, deleted = result.dynamic_partitions_requests
    assert list(added.partition_keys) == recipe_catalog.names
    assert list(deleted.partition_keys) == ["dropped-from-recipes-yaml"]
