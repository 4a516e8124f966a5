"""``edge-quant run`` brings every (model, recipe) up to date and prints the comparison; also ``prune``, ``settings``.

It runs the same jobs the Dagster UI launches, on the instance in ``DAGSTER_HOME``
(the current directory by default, so ``dagster dev`` started there shows the
same runs and materializations).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge_quant_pipeline.toolchain import quiet_third_party_noise

if TYPE_CHECKING:
    from edge_quant_pipeline.runs.workers import Worker


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-quant", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="convert, quantize, evaluate and publish every (model, recipe)")
    run.add_argument("--model", action="append", help="only this model id (repeatable); default: every checkpoint")
    run.add_argument("--recipe", action="append", help="only this recipe (repeatable); default: the whole catalog")
    run.add_argument("--all", action="store_true", help="rebuild everything, not only what changed or failed")
    run.add_argument(
        "--jobs",
        type=int,
        default=default_jobs(),
        help="runs at the same time, each in a worker process of its own (default: one per core, at most 4); "
        "fewer start when their estimated memory does not fit",
    )
    run.add_argument(
        "--memory-gb",
        type=float,
        help="how much memory runs side by side may take, by their estimated peaks (default: what the largest "
        "run needs alone, which the machine must fit anyway, and one worker holding no model; raise it on machines "
        "with memory and cores to spare)",
    )
    run.add_argument(
        "--convert-only",
        action="store_true",
        help="only checkpoint -> float .tflite -> quantized .tflite; no evaluation, publishing or reports",
    )
    run.add_argument(
        "--wide",
        action="store_true",
        help="print every column of the comparison (top-1, KL percentiles, SQNR, latency, memory); default: the "
        "columns that decide, in about 120 characters",
    )
    run.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' output (TensorFlow, LiteRT, torch...) here; it is always in the run logs",
    )
    commands.add_parser(
        "settings", help="every EDGE_QUANT_* setting: its value as the pipeline reads it, and where it came from"
    )
    prune = commands.add_parser(
        "prune",
        help="remove the store's versions that retention does not keep (EDGE_QUANT_KEEP_VERSIONS), and the work "
        "folder's files that no current step reads",
    )
    prune.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    return parser.parse_args(argv)


def default_jobs() -> int:
    """One run per core, at most 4: the steps are CPU-bound."""
    return max(1, min(os.cpu_count() or 1, 4))


def checked_recipes(selected: list[str] | None) -> list[str]:
    """Every ``EDGE_QUANT_*`` setting, ``recipes.yaml`` and the recipes this run would use, before any work:
    a SettingError or RecipeError with one line per problem."""
    from edge_quant_pipeline import settings
    from edge_quant_pipeline.quantize.catalog import load_catalog
    from edge_quant_pipeline.quantize.recipes import RecipeError

    settings.check()
    catalog = load_catalog(settings.recipes_file())
    problems = []
    for name in selected or catalog.names:
        try:
            catalog.get(name)
        except RecipeError as error:
            problems.append(str(error))
    if problems:
        raise RecipeError("\n".join(problems))
    return selected or catalog.names


def run(args: argparse.Namespace) -> int:
    quiet_third_party_noise()  # before the workers start, and the resource tracker with them, which reads it
    from edge_quant_pipeline.runs.workers import FIRST_WORKERS, Worker

    # They import the code location (seconds) while this process checks the settings and plans; the launch takes them.
    started = [Worker(args.verbose) for _ in range(min(args.jobs, FIRST_WORKERS))]
    try:
        return _run(args, started)
    finally:
        for worker in started:  # those the launch did not take: a mistake found first, or nothing to do
            worker.dismiss()


def _run(args: argparse.Namespace, started: list["Worker"]) -> int:
    from edge_quant_pipeline.quantize.recipes import RecipeError
    from edge_quant_pipeline.settings import SettingError

    try:
        recipes = checked_recipes(args.recipe)
    except (SettingError, RecipeError) as error:
        print(error, file=sys.stderr)  # the messages say what to fix; a traceback would only bury them
        return 2
    import dagster as dg

    from edge_quant_pipeline import graph, settings
    from edge_quant_pipeline.checkpoints.folders import scan_checkpoints
    from edge_quant_pipeline.config import pipeline_config_from_env
    from edge_quant_pipeline.publish.report import REPORT_FILE, TERMINAL_COLUMNS, read_parquet, to_markdown
    from edge_quant_pipeline.rebuild import forgettable_models
    from edge_quant_pipeline.runs.launch import materialize

    scan = scan_checkpoints(settings.checkpoint_dir())
    models = args.model or list(scan.found)
    unknown = [model for model in models if model not in scan.found]
    if unknown:  # before any work: a typo would otherwise become a partition that fails for good
        for model in unknown:
            reason = scan.refusal_for(model) or f"no checkpoint folder of that id in {settings.checkpoint_dir()}"
            print(
                f"--model {model!r}: {reason}; the checkpoints there: {', '.join(scan.found) or 'none'}.",
                file=sys.stderr,
            )
        return 2
    print(f"Dagster instance: {os.environ['DAGSTER_HOME']}")
    print(f"Checkpoints:      {settings.checkpoint_dir()} ({', '.join(models) or 'none'})")
    for refused in scan.refused:
        print(f"  skipped: {refused.reason}")
    instance = dg.DagsterInstance.get()
    for model in forgettable_models(instance, scan.model_ids):
        instance.delete_dynamic_partition(graph.MODEL_PARTITION, model)
        print(f"  forgotten: {model!r}, whose folder is gone and which never converted (its partition is deleted)")
    print()
    pipeline = pipeline_config_from_env()
    summary = materialize(
        instance,
        pipeline,
        models,
        recipes,
        rebuild_all=args.all,
        jobs=args.jobs,
        conversion_only=args.convert_only,
        memory_budget_mb=args.memory_gb * 1024 if args.memory_gb else None,
        verbose=args.verbose,
        started=started,
    )
    if summary.interrupted_by:
        stopped = ", ".join(f"{r.job} {r.label}".strip() for r in summary.interrupted) or "none"
        print(
            f"\nInterrupted by {summary.interrupted_by}: {len(summary.outcomes)} run(s) finished, "
            f"{len(summary.interrupted)} stopped and marked failed ({stopped}), {len(summary.not_started)} not "
            "started. Run `edge-quant run` again to finish the work."
        )
        return 130
    for model in [] if args.convert_only else models:
        report = read_parquet(pipeline.store / model / REPORT_FILE)  # as of now, whoever wrote it
        if report is not None:
            champion = next((row.recipe for row in report.itertuples() if row.champion), "none")
            table = to_markdown(report, None if args.wide else TERMINAL_COLUMNS)
            print(f"\n{model}\n\n{table}\n\nChampion (smallest published): {champion}")
            if not args.wide:
                print(f"Every column: --wide, or {pipeline.store / model / REPORT_FILE}")
    layout = "<model>/<recipe>/<version>/model.tflite, model.litertlm, manifest.json"
    print(f"\nArtifacts:        {pipeline.store}  ({layout})")
    print(f"Reports:          {pipeline.store}/report.parquet, {pipeline.store}/<model>/report.parquet")
    refused = len(summary.too_large)
    if refused:
        print(f"{refused} run(s) not started: they need more memory than this machine has (above).")
    if summary.failures:
        print(f"{summary.failures} run(s) failed; see them with `dagster dev`.")
    elif not refused:
        print("All runs succeeded.")
    elif summary.outcomes:
        print("The other runs succeeded.")
    return 1 if summary.failures or summary.too_large else 0


def show_settings() -> int:
    """A table of every setting; exit status 2 when one is bad (its row says why and how to fix it)."""
    from tabulate import tabulate

    from edge_quant_pipeline.settings import described

    rows = described()
    problems = [s.value for s in rows if s.source == "problem"]
    table = [(s.name, "(see below)" if s.source == "problem" else s.value, s.source) for s in rows]
    print(tabulate(table, headers=("setting", "value", "from")))
    for problem in problems:
        print(f"\n{problem}")
    return 2 if problems else 0


def prune(args: argparse.Namespace) -> int:
    """The store down to what retention keeps, then the work folder down to what current steps read; exit status 2
    for a bad setting."""
    from edge_quant_pipeline import settings

    try:
        settings.check()
    except settings.SettingError as error:
        print(error, file=sys.stderr)
        return 2
    from edge_quant_pipeline.config import pipeline_config_from_env

    pipeline = pipeline_config_from_env()
    verb = "Would remove" if args.dry_run else "Removed"
    _prune_store(pipeline.artifact_store, args.dry_run, verb)
    _prune_work_folder(pipeline, args.dry_run, verb)
    return 0


def _prune_store(store, dry_run: bool, verb: str) -> None:
    from edge_quant_pipeline.publish.retention import prune_store

    if store.keep_versions == 0:
        print("EDGE_QUANT_KEEP_VERSIONS=0: the store keeps every version.")
        return
    removed = prune_store(store.root, store.keep_versions, dry_run=dry_run)
    for version in removed:
        print(f"{verb} {version.describe()}")
    freed = sum(version.bytes for version in removed) / 1e6
    kept = f"the newest {store.keep_versions} of each (model, recipe), and what latest.json and champion.json name"
    print(f"{verb} {len(removed)} version(s), {freed:,.1f} MB, from {store.root}; kept {kept}.")


def _prune_work_folder(pipeline, dry_run: bool, verb: str) -> None:
    import dagster as dg

    from edge_quant_pipeline.checkpoints.folders import scan_checkpoints
    from edge_quant_pipeline.publish.retention import remove_stale_work, stale_work
    from edge_quant_pipeline.rebuild import current_work, runs_in_progress

    work_dir = Path(pipeline.work_dir)
    if pipeline.work_store:
        print(f"{work_dir}: a cache of the work store, bounded by EDGE_QUANT_WORK_CACHE_GB; not pruned here.")
        return
    instance = dg.DagsterInstance.get()
    print(f"Dagster instance: {os.environ['DAGSTER_HOME']} (what is current in {work_dir} is what its runs recorded)")
    if in_progress := runs_in_progress(instance):
        print(f"{work_dir}: not pruned, {in_progress} run(s) of this instance are in progress; try when none is.")
        return
    present = set(scan_checkpoints(Path(pipeline.checkpoint_dir)).model_ids)
    stale = stale_work(work_dir, current_work(instance, present))
    if not dry_run:
        remove_stale_work(stale)
    for work in stale:
        print(f"{verb} {work.describe()}")
    freed = sum(work.bytes for work in stale) / 1e6
    print(f"{verb} {len(stale)} folder(s) and file(s), {freed:,.1f} MB, from {work_dir}; kept what current steps read.")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("DAGSTER_HOME", str(Path.cwd()))  # the instance `dagster dev` started here shows
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)  # a new instance's folder, as Dagster needs
    if args.command == "settings":
        return show_settings()
    return prune(args) if args.command == "prune" else run(args)


def console_main() -> None:
    """The `edge-quant` command. Everything is written and closed when ``main`` returns, so it exits
    without the interpreter's teardown, which torch + TensorFlow stretch to about 2 s."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
