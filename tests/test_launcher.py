"""Which Dagster runs `edge-quant run` launches for a rebuild plan, and what each waits for."""

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import dagster as dg

from edge_quant_pipeline.config import pipeline_config_from_env
from edge_quant_pipeline.graph import MODEL_ASSETS
from edge_quant_pipeline.memory import machine_memory
from edge_quant_pipeline.runs.launch import launch, too_large
from edge_quant_pipeline.runs.plan import DueReports, PlannedRun, plan_runs
from edge_quant_pipeline.runs.workers import Lane, LaunchContext, Worker, step_failure_reason
from edge_quant_pipeline.staleness import RebuildPlan

MODELS, RECIPES = ["m1", "m2"], ["r1", "r2"]


def by_label(runs: list[PlannedRun]) -> dict[tuple[str, str], PlannedRun]:
    return {(r.job, r.label): r for r in runs}


def test_pairs_wait_for_their_conversion_and_recipe_and_reports_for_their_pairs():
    plan = RebuildPlan(convert={"m1": MODEL_ASSETS}, resolve=["r2"], quantize=[("m2", "r1")])
    runs = by_label(plan_runs(plan, MODELS, RECIPES, DueReports(models=[], all_models=False)))
    convert, resolve = runs[("convert_checkpoint", "m1")], runs[("resolve_recipe", "r2")]
    assert runs[("quantize_evaluate_publish", "m1|r1")].after == (convert,)
    assert runs[("quantize_evaluate_publish", "m1|r2")].after == (convert, resolve)
    assert runs[("quantize_evaluate_publish", "m2|r2")].after == (resolve,)
    assert runs[("quantize_evaluate_publish", "m2|r1")].after == ()
    report = runs[("report", "m2")]
    assert {r.label for r in report.after} == {"m2|r1", "m2|r2"} and report.required == ()
    # a report waits for its conversion too, and is skipped when it failed: it reads the converted checkpoint
    assert runs[("report", "m1")].after[0] == convert and runs[("report", "m1")].required == (convert,)
    assert set(runs[("report_all_models", "")].after) == {runs[("report", "m1")], report}
    assert len(runs) == 2 + 4 + 2 + 1


def test_conversions_are_planned_first():
    plan = RebuildPlan(convert={"m1": MODEL_ASSETS, "m2": MODEL_ASSETS}, resolve=["r1"])
    jobs = [r.job for r in plan_runs(plan, MODELS, RECIPES, None)]
    assert jobs[:3] == ["convert_checkpoint", "convert_checkpoint", "resolve_recipe"]


def test_nothing_to_do_launches_nothing_unless_a_report_is_due():
    assert plan_runs(RebuildPlan(), MODELS, RECIPES, DueReports(models=[], all_models=False)) == []
    due = by_label(plan_runs(RebuildPlan(), MODELS, RECIPES, DueReports(models=["m2"], all_models=False)))
    assert set(due) == {("report", "m2"), ("report_all_models", "")}


def test_convert_only_plans_no_reports():
    runs = plan_runs(RebuildPlan(convert={"m1": MODEL_ASSETS}), MODELS, RECIPES, None)
    assert {r.job for r in runs} == {"convert_checkpoint", "quantize_evaluate_publish"}


def test_a_new_eval_text_converts_only_the_float_reference():
    runs = plan_runs(RebuildPlan(convert={"m1": ("float_reference",)}), MODELS, RECIPES, None)
    convert = next(r for r in runs if r.job == "convert_checkpoint")
    assert convert.assets == ("float_reference",) and convert.label == "m1 (float_reference)"


def test_a_failed_step_is_explained_by_its_own_exception_not_dagsters_wrapper():
    @dg.asset
    def full_disk():
        raise OSError(28, "No space left on device")

    result = dg.materialize([full_disk], raise_on_error=False)
    (failure,) = [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
    assert failure.cls_name == "DagsterExecutionStepExecutionError"
    assert step_failure_reason(failure) == "OSError: [Errno 28] No space left on device"


def test_a_failure_raised_on_purpose_is_its_description_alone():
    @dg.asset
    def refused_recipe():
        raise dg.Failure(description="int3 on tiny: recipe failed: int3 is not a scheme.")

    result = dg.materialize([refused_recipe], raise_on_error=False)
    (failure,) = [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
    assert failure.message.startswith("dagster._core.definitions.events.Failure: ")
    assert step_failure_reason(failure) == "int3 on tiny: recipe failed: int3 is not a scheme."


def _run_in_a_fresh_worker(launch: LaunchContext, run: PlannedRun) -> tuple[list[str], set[str]]:
    # Runs in a spawned process, which imports this module (not conftest: that would pick new folders).
    outcome = Lane(launch).execute(run)
    return outcome.failures, set(sys.modules)


def test_a_model_recipe_run_needs_no_torch(demo_sandbox, demo_checkpoint_dir):
    """Quantize, evaluate and publish in a worker process that never imports torch, TensorFlow or
    litert-torch: what keeps workers near 300 MB and their runs free of a 5 s import."""
    instance, pipeline = demo_sandbox.instance, demo_sandbox.pipeline
    run = PlannedRun("quantize_evaluate_publish", model=demo_checkpoint_dir.name, recipe="dynamic_int8")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        launch = LaunchContext(instance.get_ref(), pipeline.model_dump(), conversion_only=False)
        failures, modules = pool.submit(_run_in_a_fresh_worker, launch, run).result()
    assert failures == []
    assert {"ai_edge_quantizer", "ai_edge_litert"} <= modules
    assert not {"torch", "tensorflow", "litert_torch"} & modules


def test_a_run_that_could_never_fit_is_not_started():
    """Its estimate exceeds all this machine could give it: it fails at once, saying so, and nothing runs."""
    run = PlannedRun("convert_checkpoint", model="huge")
    with dg.instance_for_test() as instance:
        context = LaunchContext(instance.get_ref(), pipeline_config_from_env().model_dump(), conversion_only=False)
        summary = launch([run], {run: 2 * machine_memory().total_mb}, context, jobs=1)
        assert instance.get_runs() == []
    (outcome,) = summary.outcomes
    assert outcome.failures[0].startswith("not started: it needs about")
    assert "Run it on a machine with more memory" in outcome.failures[0]


def test_a_pair_that_could_never_fit_is_refused_before_the_launch_and_no_report_waits_for_it():
    """Gemma 4 E2B's fp16 on a 24 GB machine: refused with its reason before anything starts, and, the model's other
    pairs being up to date, no report is rebuilt for it (every later `edge-quant run` rebuilt one, 9.3 s)."""
    plan = RebuildPlan(quantize=[("m1", "r2")])
    reports = DueReports(models=[], all_models=False)
    runs = plan_runs(plan, MODELS, RECIPES, reports)
    (pair,) = [r for r in runs if r.recipe]
    estimates = {run: 400.0 for run in runs} | {pair: 2 * machine_memory().total_mb}
    (refused,) = too_large(runs, estimates)
    assert refused.run == pair and refused.failures[0].startswith("not started: it needs about")
    assert plan_runs(plan, MODELS, RECIPES, reports, leave_out={("m1", "r2")}) == []
    assert too_large(runs, dict.fromkeys(runs, 400.0)) == []


def test_a_run_asks_the_instance_once_whether_a_partition_exists():
    """Dagster asks it at every input of a (model, recipe) run (196 times): within a run the first answer stands, and
    after the run the instance answers from its storage again."""
    from edge_quant_pipeline.runs.workers import _partition_keys_checked_once

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("model", ["m1"])
        with _partition_keys_checked_once(instance):
            assert instance.has_dynamic_partition("model", "m1")
            instance.delete_dynamic_partition("model", "m1")
            assert instance.has_dynamic_partition("model", "m1")
        assert not instance.has_dynamic_partition("model", "m1")


def test_an_exception_that_ends_a_worker_is_named_in_the_summary():
    """What escapes a worker's run (here: a job the code location does not define) reaches the launcher by its
    type and first line, not only as the process's exit status."""
    run = PlannedRun("no_such_job")
    with dg.instance_for_test() as instance:
        context = LaunchContext(instance.get_ref(), pipeline_config_from_env().model_dump(), conversion_only=False)
        summary = launch([run], {run: 400.0}, context, jobs=1)
    (outcome,) = summary.outcomes
    (reason,) = outcome.failures
    assert reason.startswith("its worker process failed: DagsterInvariantViolationError: Could not find job")


def test_workers_started_before_the_launch_run_it_and_those_it_does_not_want_end():
    """`edge-quant run` starts workers before it plans (they import the code location meanwhile): the launch takes
    what it wants of them (here one, for its one run) and dismisses the others, which end without a run."""
    run = PlannedRun("no_such_job")
    started = [Worker(), Worker()]
    processes = [worker.process for worker in started]
    with dg.instance_for_test() as instance:
        context = LaunchContext(instance.get_ref(), pipeline_config_from_env().model_dump(), conversion_only=False)
        summary = launch([run], {run: 400.0}, context, jobs=1, started=started)
    assert started == []
    (outcome,) = summary.outcomes
    assert outcome.failures[0].startswith("its worker process failed: DagsterInvariantViolationError")
    for process in processes:
        process.join(timeout=30)
    assert sorted(process.exitcode for process in processes) == [0, 1]  # the dismissed one, the one that ran


def test_a_step_that_records_why_it_did_not_fit_is_left_out_of_its_runs_estimate():
    """The float model's tasks in LiteRT-LM hold 1.6x the float file: at 4B more than the machine; the step says so
    and its conversion run goes on, so the run is planned at its export's size, not refused for that step."""
    from edge_quant_pipeline.footprint import LITERT_PROCESS_MB, ModelSize, step_mb, steps_mb
    from edge_quant_pipeline.quantize.catalog import CalibrationNeed

    qwen3_4b = ModelSize(4_022_468_096, 36, 151_936, 8_044_936_192, 4 * 4_022_468_096, 128)
    conversion = steps_mb(list(MODEL_ASSETS), qwen3_4b, calibration=CalibrationNeed.NONE)
    assert step_mb("float_baseline", qwen3_4b) > 24_000 > conversion == step_mb("float_tflite", qwen3_4b)
    assert steps_mb(["float_baseline"], qwen3_4b) == LITERT_PROCESS_MB  # a run of it alone (new tasks, say)


def test_a_gone_checkpoint_that_never_converted_is_forgotten_and_one_that_did_is_kept():
    """A typo or an unreadable folder, once gone, leaves a partition that would show its failures for good: it
    goes. A model that converted keeps its partition (its history, its published versions) when its folder goes."""
    from edge_quant_pipeline.rebuild import forgettable_models

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("model", ["converted", "typo", "here"])
        instance.report_runless_asset_event(dg.AssetMaterialization("checkpoint", partition="converted"))
        assert forgettable_models(instance, {"here"}) == ["typo"]
        assert forgettable_models(instance, {"here", "typo"}) == []
