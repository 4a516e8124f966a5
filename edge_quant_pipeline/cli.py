"""``edge-quant run``: bring every (model, recipe) up to date, then print the comparison.

It runs the same jobs the Dagster UI launches, on the instance in ``DAGSTER_HOME``
(the current directory by default, so ``dagster dev`` started there shows the
same runs and materializations).
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-quant", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="convert, quantize, evaluate and publish every (model, recipe)")
    run.add_argument("--model", action="append", help="only this model id (repeatable); default: every checkpoint")
    run.add_argument("--recipe", action="append", help="only this recipe (repeatable); default: the whole catalog")
    run.add_argument("--all", action="store_true", help="rebuild everything, not only what changed or failed")
    return parser.parse_args(argv)


class Runner:
    """Runs one job for one partition and prints a line a human can follow.

    ``step_seconds`` keeps (partition, step, seconds) of every step run, for benchmarks.
    """

    def __init__(self, defs, instance, pipeline):
        self.defs, self.instance, self.pipeline, self.failures = defs, instance, pipeline, 0
        self.step_seconds: list[tuple[str, str, float]] = []

    def __call__(self, job_name: str, partition_key) -> object | None:
        started = time.perf_counter()
        result = self.defs.resolve_job_def(job_name).execute_in_process(
            partition_key=partition_key,
            instance=self.instance,
            raise_on_error=False,
            run_config=RUN_CONFIG,
            resources={"pipeline": self.pipeline},
        )
        self.step_seconds += [
            (str(partition_key), e.step_key, e.event_specific_data.duration_ms / 1000)
            for e in result.all_events
            if e.is_step_success
        ]
        line = f"  {job_name:<26} {partition_key or '':<42} {time.perf_counter() - started:6.1f}s"
        reasons = [
            f"check {c.check_name}: {c.description}" for c in result.get_asset_check_evaluations() if not c.passed
        ]
        reasons += [
            e.step_failure_data.error.message.strip().splitlines()[0] for e in result.all_events if e.is_step_failure
        ]
        if result.success and not reasons:
            print(f"{line}  ok", flush=True)
            return result
        self.failures += 1
        print(f"{line}  FAILED" + "".join(f"\n      {reason}" for reason in reasons), flush=True)
        return None


def materialize(defs, instance, pipeline, models: list[str], recipes: list[str], rebuild_all: bool = False) -> Runner:
    """Rebuild what is out of date (everything with ``rebuild_all``), in dependency order, then the reports.

    The same plan the nightly schedules follow; here one process runs each stage
    itself instead of leaving the cascade to the automation daemon.
    """
    import dagster as dg

    from edge_quant_pipeline.defs.rebuild import rebuild_plan
    from edge_quant_pipeline.report import to_markdown

    instance.add_dynamic_partitions("model", [m for m in models if not instance.has_dynamic_partition("model", m)])
    plan = rebuild_plan(instance, pipeline, models, recipes, rebuild_all=rebuild_all)
    runner = Runner(defs, instance, pipeline)
    if plan.empty:
        print("Everything is up to date: nothing to convert or quantize.")
    for recipe in plan.resolve:
        runner("resolve_recipe", recipe)
    for model in plan.convert:
        runner("convert_checkpoint", model)
    for model, recipe in plan.affected_pairs(models, recipes):
        runner("quantize_evaluate_publish", dg.MultiPartitionKey({"model": model, "recipe": recipe}))
    for model in models:
        report = runner("report", model)
        if report is not None:
            print(f"\n{model}\n\n" + to_markdown(report.output_for_node("quantization_report")))
    runner("report_all_models", None)
    return runner


def _quiet_third_party_noise() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*is currently in beta.*")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("DAGSTER_HOME", str(Path.cwd()))
    _quiet_third_party_noise()
    import dagster as dg

    from edge_quant_pipeline import settings
    from edge_quant_pipeline.checkpoints import find_checkpoints
    from edge_quant_pipeline.definitions import defs, pipeline_config_from_env
    from edge_quant_pipeline.defs.partitions import recipe_catalog

    models = args.model or list(find_checkpoints(settings.checkpoint_dir()))
    print(f"Dagster instance: {os.environ['DAGSTER_HOME']}")
    print(f"Checkpoints:      {settings.checkpoint_dir()} ({', '.join(models)})\n")
    pipeline = pipeline_config_from_env()
    runner = materialize(
        defs, dg.DagsterInstance.get(), pipeline, models, args.recipe or recipe_catalog.names, rebuild_all=args.all
    )
    print(f"\nArtifacts:        {pipeline.store}  (<model>/<recipe>/<version>/model.tflite + manifest.json)")
    print(f"Reports:          {pipeline.store}/report.parquet, {pipeline.store}/<model>/report.parquet")
    print(
        f"{runner.failures} run(s) failed; see them with `dagster dev`." if runner.failures else "All runs succeeded."
    )
    return 1 if runner.failures else 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
