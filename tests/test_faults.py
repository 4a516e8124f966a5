"""Fault injection, for real: a hostile checkpoint folder, files vanishing under the sensor, runs killed
with SIGKILL in the middle of an export, and two `edge-quant run` processes on one instance at once.

What each fault shows the user and what survives it is the table in docs/faults.md
("Faults and what survives them").
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from conftest import DEMO_MODEL, REPO
from test_checkpoints import edit_tensors

from edge_quant_pipeline import processes
from edge_quant_pipeline.checkpoints.validate import UNREADABLE
from edge_quant_pipeline.config import ArtifactStore, PipelineConfig
from edge_quant_pipeline.defs.automation import checkpoint_sensor
from edge_quant_pipeline.liveness import PROCESS_TAG
from edge_quant_pipeline.publish.store import LATEST, MANIFEST, MODEL_FILE, STAGING

HUGE = 20 << 30  # a sparse 20 GB file: reading it would take far longer than the checks may


def sensor_tick(instance, pipeline, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"pipeline": pipeline}) as context:
        return checkpoint_sensor(context)


def pipeline_for(root: Path, tmp_path: Path) -> PipelineConfig:
    return PipelineConfig(
        checkpoint_dir=str(root),
        artifact_store=ArtifactStore(url=str(tmp_path / "store")),
        work_dir=str(tmp_path / "w"),
    )


def cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def make_sparse(path: Path, size: int) -> None:
    with path.open("wb") as stream:
        stream.truncate(size)


def drop_config_field(folder: Path, field: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != field}))


def set_config_field(folder: Path, field: str, value) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))


def replace_weights_with_a_folder(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


def link_weights_from_outside(folder: Path) -> None:
    outside = folder.parent.parent / f"{folder.name}.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)


# Each bad checkpoint: the folder name, how to damage a copy of the demo, and what its failure says.
BAD_CHECKPOINTS = {
    "truncated": (lambda d: cut(d / "model.safetensors", 0.5), "model.safetensors: not a readable safetensors"),
    "empty-weights": (lambda d: cut(d / "model.safetensors", 0), "model.safetensors: empty file"),
    "huge-weights": (lambda d: make_sparse(d / "model.safetensors", HUGE), "model.safetensors: not a readable"),
    "empty-config": (lambda d: cut(d / "config.json", 0), "config.json: empty file"),
    "bad-json": (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    "config-list": (lambda d: (d / "config.json").write_text("[]"), "config.json: holds a JSON list"),
    "no-vocab": (lambda d: drop_config_field(d, "vocab_size"), "config.json lacks the field 'vocab_size'"),
    "text-size": (lambda d: set_config_field(d, "hidden_size", "128"), "config.json: hidden_size='128': sizes must be"),
    "weights-folder": (replace_weights_with_a_folder, "model.safetensors: not a regular file"),
    "link-out": (link_weights_from_outside, "model.safetensors: a symbolic link to"),
}
# Folders the pipeline refuses for their name or their place, and how it says so.
REFUSED = {
    "linked-folder": "linked-folder: a symbolic link to",
    "a-b": "folders 'a b' and 'a-b' both make the model id 'a-b'",
}


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory, demo_checkpoint_dir) -> Path:
    """A watched folder holding good checkpoints, broken ones, badly named ones and things that are no
    checkpoint at all, as people and training jobs leave them."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "checkpoints"
    root.mkdir()
    for name in ["good", "x|y", "a b", "a-b", "模型", *BAD_CHECKPOINTS]:
        shutil.copytree(demo_checkpoint_dir, root / name)
    for name, (damage, _) in BAD_CHECKPOINTS.items():
        damage(root / name)
    shutil.copytree(demo_checkpoint_dir, base / "outside")
    (root / "linked-folder").symlink_to(base / "outside")
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "upload-in-progress").mkdir()  # no config.json yet
    make_sparse(root / "stray.bin", HUGE)
    return root


def test_a_hostile_folder_never_stops_the_sensor(hostile_folder, tmp_path, capfd):
    """Every good checkpoint gets its run; every bad one gets a run that fails with the reason, without its
    bytes being read; names that make no id, or one id twice, are refused with a warning."""
    pipeline = pipeline_for(hostile_folder, tmp_path)
    with dg.instance_for_test() as instance:
        first = sensor_tick(instance, pipeline)
        started = time.monotonic()
        settled = sensor_tick(instance, pipeline, first.cursor)
        seconds = time.monotonic() - started
    keys = {r.partition_key: r.run_key.split("@")[1] for r in settled.run_requests}  # model@version@code versions
    assert seconds < 5, "the sensor read the 20 GB files instead of failing fast"
    assert set(keys) == {"good", "x-y", "linked-folder", *BAD_CHECKPOINTS}  # not "a-b", nor "模型"
    assert keys["good"] == keys["x-y"] and len(keys["good"]) == 64  # the same bytes, the same sha256
    # What the cheap checks catch is not even hashed; a config that only litert-torch's mapping
    # refuses ("no-vocab") is hashed, and fails at the `checkpoint` step like the others.
    unread = {name for name, key in keys.items() if key.startswith(UNREADABLE)}
    assert unread == set(keys) - {"good", "x-y", "no-vocab"}
    log = capfd.readouterr().err
    assert "folders 'a b' and 'a-b' both make the model id 'a-b'" in log and "Rename all but one" in log
    assert "模型: no model id can be made from this folder name" in log
    assert "huge-weights/model.safetensors: not a readable safetensors file" in log


def test_each_bad_checkpoint_fails_its_own_partition_with_the_reason(hostile_folder, tmp_path):
    from edge_quant_pipeline.definitions import build_definitions

    defs = build_definitions(pipeline_for(hostile_folder, tmp_path))
    expected = {**{name: message for name, (_, message) in BAD_CHECKPOINTS.items()}, **REFUSED}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("model", [*expected, "good"])
        results = {
            key: defs.resolve_job_def("convert_checkpoint").execute_in_process(
                partition_key=key,
                instance=instance,
                asset_selection=[dg.AssetKey("checkpoint")],
                raise_on_error=False,
            )
            for key in [*expected, "good"]
        }
    assert results.pop("good").success  # its neighbours' faults are not its own
    for key, result in results.items():
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        message = failure.step_failure_data.error.message
        assert expected[key] in message and str(hostile_folder) in message, (key, message)
        assert "Traceback" not in message, (key, message)


def test_weights_that_do_not_fit_the_config_fail_the_export_naming_the_tensor(tmp_path, demo_checkpoint_dir):
    from edge_quant_pipeline.definitions import build_definitions

    root = tmp_path / "checkpoints"
    shutil.copytree(demo_checkpoint_dir, root / "deeper")
    edit_tensors(
        root / "deeper",
        lambda t: t.update({"model.layers.4.mlp.up_proj.weight": t["model.layers.3.mlp.up_proj.weight"].clone()}),
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("model", ["deeper"])
        result = (
            build_definitions(pipeline_for(root, tmp_path))
            .resolve_job_def("convert_checkpoint")
            .execute_in_process(
                partition_key="deeper",
                instance=instance,
                asset_selection=[dg.AssetKey("checkpoint"), dg.AssetKey("float_tflite")],
                raise_on_error=False,
            )
        )
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_key == "float_tflite"
    assert (
        f"{root / 'deeper' / 'model.safetensors'}: weights do not match config.json (a 'llama' model): "
        "1 tensor(s) it does not use: model.layers.4.mlp.up_proj.weight."
    ) in failure.step_failure_data.error.message


CHURN = """
import sys
from pathlib import Path
folder = Path(sys.argv[1])
folder.mkdir()
while True:
    for i in range(300):
        (folder / f"f{i}").write_bytes(b"x")
    for i in range(300):
        (folder / f"f{i}").unlink()
"""


@contextlib.contextmanager
def churning(folder: Path):
    """Another process creating and deleting files in ``folder`` as fast as it can."""
    process = subprocess.Popen([sys.executable, "-c", CHURN, str(folder)])
    try:
        while not folder.is_dir():
            time.sleep(0.01)
        yield
    finally:
        process.kill()
        process.wait()


def test_files_vanishing_while_read_skip_the_checkpoint_for_a_tick(tmp_path, demo_checkpoint_dir, capfd):
    from edge_quant_pipeline.checkpoints.validate import CheckpointError, read_checkpoint

    root = tmp_path / "checkpoints"
    shutil.copytree(demo_checkpoint_dir, root / "busy")
    pipeline = pipeline_for(root, tmp_path)
    skipped = unreadable = 0
    with churning(root / "busy" / "scratch"), dg.instance_for_test() as instance:
        cursor = None
        for _ in range(300):  # until both races were hit; each tick takes milliseconds
            result = sensor_tick(instance, pipeline, cursor)  # must not raise
            cursor = result.cursor
            skipped += "Could not read" in capfd.readouterr().err
            try:
                read_checkpoint(root / "busy")
            except CheckpointError as error:
                assert "could not be read (No such file or directory)" in str(error)
                unreadable += 1
            if skipped and unreadable:
                break
    assert skipped and unreadable, "the churn never raced the sensor; the test proved nothing"


# --- Whole runs, killed and concurrent, on an instance configured like the project's -----------------

# One quantized recipe: a kill, a race or a worker's death shows as well on one pair as on several.
RECIPES = ["dynamic_int8"]


@pytest.fixture(scope="module")
def home(tmp_path_factory, demo_checkpoint_dir) -> Path:
    """DAGSTER_HOME with the project's dagster.yaml (its pool and run queue limits), one checkpoint."""
    home = tmp_path_factory.mktemp("instance")
    shutil.copy(REPO / "dagster.yaml", home)
    shutil.copytree(demo_checkpoint_dir, home / "checkpoints" / DEMO_MODEL)
    return home


def start_run(home: Path, log_name: str) -> subprocess.Popen:
    (home / "no-recipes.yaml").write_text("recipes: {}\n")  # the built-in recipes alone
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "EDGE_QUANT_CHECKPOINT_DIR": str(home / "checkpoints"),
        "EDGE_QUANT_ARTIFACT_DIR": str(home / "artifacts"),
        "EDGE_QUANT_WORK_DIR": str(home / "work"),
        "EDGE_QUANT_RECIPES": str(home / "no-recipes.yaml"),
    }
    recipes = [arg for recipe in RECIPES for arg in ("--recipe", recipe)]
    with (home / log_name).open("w") as log:  # a file, not a pipe: conversion logs would fill a pipe and block
        return subprocess.Popen(
            [sys.executable, "-m", "edge_quant_pipeline.cli", "run", *recipes],
            cwd=home,  # dagster.yaml's storage paths are relative to it
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the kill takes its children too
        )


@contextlib.contextmanager
def instance_at(home: Path):
    with contextlib.chdir(home), dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def export_scratch(home: Path) -> list[Path]:
    return list((home / "work").glob("*/*/.float.tflite.tmp-*"))


def wait_until_exporting(home: Path, process: subprocess.Popen, log_name: str) -> None:
    deadline = time.monotonic() + 240
    while not export_scratch(home):
        assert process.poll() is None, (home / log_name).read_text()[-3000:]
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.05)


def started_conversions(instance) -> list:
    return instance.get_runs(
        filters=dg.RunsFilter(job_name="convert_checkpoint", statuses=[dg.DagsterRunStatus.STARTED])
    )


@pytest.fixture(scope="module")
def killed_run(home) -> str:
    """An `edge-quant run` SIGKILLed, with its workers, once the float export is under way; returns the run id
    of the conversion it was executing."""
    process = start_run(home, "killed.log")
    wait_until_exporting(home, process, "killed.log")
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    with instance_at(home) as instance:
        (run,) = started_conversions(instance)
    return run.run_id


@pytest.mark.graph
def test_a_run_killed_while_exporting_leaves_nothing_visible(home, killed_run):
    assert export_scratch(home)  # the killed export's scratch folder, hidden
    assert list((home / "work").glob("*/*/float.tflite")) == []
    assert not (home / "artifacts" / DEMO_MODEL).exists()  # nothing published
    with instance_at(home) as instance:
        run = instance.get_run_by_id(killed_run)
        assert run.tags[PROCESS_TAG].startswith(f"{socket.gethostname()}:")  # tagged by its checkpoint step
        # What blocked every later export until a run cleaned up after it: the pool slot it holds.
        slots = instance.event_log_storage.get_concurrency_info("litert_export").claimed_slots
        assert [slot.run_id for slot in slots] == [killed_run]


@pytest.fixture(scope="module")
def two_runs_at_once(home, killed_run) -> list[int]:
    """Two `edge-quant run` started together on the instance and store the killed run left behind."""
    processes = [start_run(home, f"concurrent-{i}.log") for i in range(2)]
    deadline = time.monotonic() + 300
    try:
        return [process.wait(timeout=max(1, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:  # timed out: take its children (the runtime profiler) too
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.graph
def test_the_next_runs_finish_the_work_and_end_the_killed_run(home, killed_run, two_runs_at_once):
    logs = [(home / f"concurrent-{i}.log").read_text()[-3000:] for i in range(2)]
    assert two_runs_at_once == [0, 0], "\n\n".join(logs)
    with instance_at(home) as instance:
        assert instance.get_run_by_id(killed_run).status == dg.DagsterRunStatus.FAILURE
        assert started_conversions(instance) == []
        assert instance.event_log_storage.get_concurrency_info("litert_export").claimed_slots == []
    assert export_scratch(home) == []  # the killed export's scratch folder was cleaned up
    assert len(list((home / "work").glob("*/*/float.tflite"))) == 1


@pytest.mark.graph
def test_two_runs_at_once_publish_each_version_once(home, two_runs_at_once):
    store = home / "artifacts" / DEMO_MODEL
    for recipe in RECIPES:
        folder = store / recipe
        (version,) = folder.glob("v-*")
        manifest = json.loads((version / MANIFEST).read_text())
        assert manifest["number"] == 1 and manifest["previous_version"] is None
        assert manifest["model_sha256"] == hashlib.sha256((version / MODEL_FILE).read_bytes()).hexdigest()
        latest = json.loads((folder / LATEST).read_text())
        assert (latest["version"], latest["number"]) == (version.name, 1)
        assert list(folder.glob(STAGING)) == []
    assert (home / "artifacts" / "report.parquet").is_file()


def test_dagster_yaml_queues_one_run_per_partition(home):
    """The instance the daemon launches through starts one run per value of the `dagster/partition` tag."""
    with instance_at(home) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits


@pytest.mark.graph
def test_a_worker_killed_mid_run_is_named_and_the_launch_goes_on(tmp_path, demo_checkpoint_dir):
    """The kernel's OOM killer (here: SIGKILL by hand) takes the worker that exports: `edge-quant run` says which
    run died and how, marks that Dagster run failed, skips what needed it and prints its summary."""
    home = tmp_path
    shutil.copy(REPO / "dagster.yaml", home)
    shutil.copytree(demo_checkpoint_dir, home / "checkpoints" / DEMO_MODEL)
    process = start_run(home, "worker-killed.log")
    deadline, worker = time.monotonic() + 240, None
    while worker is None:
        assert process.poll() is None, (home / "worker-killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.2)
        if not export_scratch(home):  # before it, opening the instance could race edge-quant run creating its storage
            continue
        with instance_at(home) as instance:
            runs = started_conversions(instance)
        if runs:
            worker = int(runs[0].tags[PROCESS_TAG].rpartition(":")[2])  # the process executing the conversion
    os.kill(worker, signal.SIGKILL)
    assert process.wait(timeout=120) == 1
    log = (home / "worker-killed.log").read_text()
    assert "its worker process was killed by SIGKILL (the kernel's out-of-memory killer, or a person)" in log
    assert log.count("skipped: its convert_checkpoint run failed") == len(RECIPES) + 1  # its pairs and its report
    assert "run(s) failed" in log  # the summary
    with instance_at(home) as instance:
        assert started_conversions(instance) == []  # marked failed by the launcher, not left STARTED


def processes_of_group(pgid: int) -> list[str]:
    """Its processes that still run (a zombie holds nothing, and a container without an init process never reaps
    the orphans it leaves)."""
    table = subprocess.run(["ps", "-eo", "pgid=,stat=,pid=,args="], capture_output=True, text=True).stdout
    return [row for row in table.splitlines() if row.split()[0] == str(pgid) and not row.split()[1].startswith("Z")]


@pytest.mark.graph
def test_sigterm_stops_the_launch_and_leaves_no_process_behind(tmp_path, demo_checkpoint_dir):
    """`kill <pid>` (a service manager stopping it, a person) while the export runs: `edge-quant run` stops its
    workers and what they started, marks their runs failed, prints its summary and exits."""
    home = tmp_path
    shutil.copy(REPO / "dagster.yaml", home)
    shutil.copytree(demo_checkpoint_dir, home / "checkpoints" / DEMO_MODEL)
    process = start_run(home, "terminated.log")
    wait_until_exporting(home, process, "terminated.log")
    os.kill(process.pid, signal.SIGTERM)  # the launcher alone, not its process group
    try:
        code = process.wait(timeout=90)
        time.sleep(1)  # what its workers started may take a moment to see their parent gone
        left = processes_of_group(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    log = (home / "terminated.log").read_text()
    assert code == 130, log[-3000:]  # 128 + SIGINT, as a shell reports an interrupted command
    assert "Interrupted by SIGTERM" in log and "stopped and marked failed (convert_checkpoint" in log, log[-3000:]
    assert left == []
    with instance_at(home) as instance:
        assert started_conversions(instance) == []
    assert not (home / "artifacts" / DEMO_MODEL).exists()


def test_a_child_of_a_step_dies_with_the_step_s_process(tmp_path):
    """What a step starts (the export, the runtime's check and profile) ends when the step's process is killed, by
    the OOM killer or a stopped launch, instead of holding the machine's memory for nobody."""
    step = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'from edge_quant_pipeline.processes import die_with_parent; die_with_parent(); import time; "
            "print(flush=True); time.sleep(120)'], stdout=subprocess.PIPE); child.stdout.readline(); "
            "print(child.pid, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(step.stdout.readline())  # once the child has asked for its death signal
    step.kill()
    step.wait()
    deadline = time.monotonic() + 5
    while processes.is_alive(child):
        assert time.monotonic() < deadline, f"the child {child} outlived the step's process"
        time.sleep(0.05)
