"""Real model shapes through the whole pipeline, against the bare toolchain, on this machine, in one run.

For each shape, a checkpoint with random weights of the published config is written here by ``transformers``
(bfloat16 as such models ship, with a tokenizer of the real vocabulary size; never committed), then, each in
fresh processes:

  imports         torch, TensorFlow and litert-torch imported, nothing exported (the export's fixed cost)
  bare export     litert-torch's export with its default conversion, as a user scripts it: the Generative API
                  rebuild for a family it has, ``export_hf`` for the others (``bench_export.py``'s children);
                  stopped where its process tree passes ``--memory-cap-gb``, before the kernel's OOM killer
  bare quantize   a script applying each default recipe to that float file with ai-edge-quantizer, as it ships
                  (skipped when the bare export was stopped: there is no float file to quantize)
  pipeline        ``edge-quant run --model <shape>`` on a fresh instance: the whole graph, every default recipe
                  (those that cannot fit refused up front); the demo's tasks left out (``--tasks``), since
                  random weights score nothing on them
  runtime         each of the pipeline's ``.tflite`` files alone in the runtime (``evaluate.profile``): prefill speed
  re-run          ``edge-quant run --model <shape>`` again, nothing changed

and prints per stage wall time, CPU time, peak RSS, the estimate the pipeline admitted the stage with, and the
targets of issues #14 and #29 side by side with the measured ratios. The gates are set to pass (random weights
make quality meaningless, and every recipe should reach publishing).

    python benchmarks/bench_scale.py                          # smollm2-135m, then qwen2.5-0.5b
    python benchmarks/bench_scale.py --shape llama3.2-3b      # also qwen3-4b, gemma4-e2b (about an hour each)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from measure import Measurement, run_measured

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ["smollm2-135m", "qwen2.5-0.5b"]
PERMISSIVE_GATES = "gates: {max_perplexity_ratio: 1000, min_top1_agreement: 0}\n"
GB = 1024


# --- the bare scripts, run in fresh processes through this file ---------------------------------------


def bare_quantize(float_tflite: str, recipes_yaml: str, timings: str) -> None:
    """Each quantizing recipe of the catalog through ai-edge-quantizer as it ships (no workaround of ours)."""
    from ai_edge_quantizer import quantizer

    from edge_quant_pipeline.quantize.catalog import load_catalog
    from edge_quant_pipeline.quantize.translate import ai_edge_quantizer_recipe

    seconds = {}
    for name, recipe in load_catalog(Path(recipes_yaml)).recipes.items():
        if recipe.is_float:
            continue
        started = time.perf_counter()
        rules = ai_edge_quantizer_recipe(recipe, tied_lm_head=True)
        try:
            quantizer.Quantizer(Path(float_tflite).read_bytes(), rules).quantize(enable_progress_bar=False)
        except ValueError as error:  # e.g. an int4 block size that does not divide the model's widths
            print(f"{name}: {error}", flush=True)
        seconds[name] = time.perf_counter() - started
    Path(timings).write_text(json.dumps(seconds))


def bare_export_path(checkpoint_dir: str) -> None:
    """Prints the upstream exporter a user scripts for this family: the Generative API rebuild where it has one
    (in a child: the answer imports litert-torch, 1.3 GB that this process keeps out of the machine)."""
    from edge_quant_pipeline.checkpoints.validate import validate_checkpoint
    from edge_quant_pipeline.export.exporters import GENERATIVE_API, plan_export

    folder = Path(checkpoint_dir)
    plan = plan_export(validate_checkpoint(folder), folder / "config.json")
    print("generative" if plan.exporter == GENERATIVE_API else "export_hf")


CHILDREN = {"bare_quantize": bare_quantize, "bare_export_path": bare_export_path}


# --- measuring ---------------------------------------------------------------------------------------------


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def this_script(child: str, *args: str) -> list[str]:
    return python(__file__, "--child", child, *args)


def bench_export_child(name: str, *args: str) -> list[str]:
    return python(str(Path(__file__).with_name("bench_export.py")), "--child", name, *args)


def edge_quant(shape: str, recipes: list[str]) -> list[str]:
    """``edge-quant run`` of the shape, with ``recipes`` (none: every recipe of the catalog)."""
    return python("-m", "edge_quant_pipeline.cli", "run", "--model", shape, *(f"--recipe={r}" for r in recipes))


@dataclass
class Bench:
    root: Path
    shape: str
    tasks: str

    @property
    def home(self) -> Path:
        return self.root / "pipeline"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints" / self.shape

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "DAGSTER_HOME": str(self.home),
            "EDGE_QUANT_CHECKPOINT_DIR": str(self.checkpoint_dir.parent),
            "EDGE_QUANT_ARTIFACT_DIR": str(self.home / "artifacts"),
            "EDGE_QUANT_WORK_DIR": str(self.home / "work"),
            "EDGE_QUANT_RECIPES": str(self.home / "recipes.yaml"),
            "EDGE_QUANT_TASKS": self.tasks,
        }

    def measure(
        self, name: str, command: list[str], cwd: Path, ok: tuple[int, ...] = (0,), cap_mb: float | None = None
    ) -> Measurement:
        """``ok``: the exit statuses that mean the command did its work (``edge-quant run`` exits 1 when a
        recipe failed, as int4 with a block size the model's widths do not divide does). Above ``cap_mb`` the
        command is stopped, and that is a measurement too."""
        print(f"  {name} ...", flush=True)
        measured = run_measured(command, cwd, self.env(), self.root / f"{name}.log", cap_mb)
        if measured.capped:
            print(f"  {name}: {stopped(measured)}", flush=True)
            return measured
        if measured.status not in ok:
            raise SystemExit(f"{name} failed ({measured.status}):\n{(self.root / f'{name}.log').read_text()[-4000:]}")
        print(
            f"  {name}: {measured.wall_s:.1f} s, {measured.peak_tree_mb / GB:.2f} GB peak (process tree) at "
            f"{measured.peak_at_s:.0f} s: {measured.peak_breakdown}",
            flush=True,
        )
        return measured

    def prepare(self) -> None:
        # In a process of its own: this one stays free of torch while it measures.
        self.measure(
            "checkpoint",
            python("-m", "edge_quant_pipeline.synthetic", self.shape, str(self.checkpoint_dir.parent)),
            self.root,
        )
        self.home.mkdir(parents=True)
        shutil.copy(REPO / "dagster.yaml", self.home)  # the instance a user gets
        # The project's recipes (the selective example), with gates that random weights pass.
        (self.home / "recipes.yaml").write_text((REPO / "recipes.yaml").read_text() + PERMISSIVE_GATES)


def stopped(m: Measurement) -> str:
    return f"stopped at {m.peak_tree_mb / GB:.2f} GB after {m.wall_s:.0f} s (the memory cap)"


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    cpu_s: float | None
    peak_mb: float | None
    estimate_mb: float | None
    reads_bytes: int | None  # the largest model file it reads (the target's "3x")


def pipeline_stages(home: Path, shape: str) -> tuple[list[Stage], dict[str, dict]]:
    """Every step of the pipeline's runs, from the instance: duration, and the usage its metadata records."""
    import dagster as dg

    os.chdir(home)  # dagster.yaml's storage paths are relative to where Dagster starts
    instance = dg.DagsterInstance.from_config(str(home))
    stages, evaluations = [], {}
    for run in reversed(instance.get_runs()):
        partition = run.tags.get("dagster/partition", "")
        durations = {
            r.dagster_event.step_key: r.dagster_event.event_specific_data.duration_ms / 1000
            for r in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        }
        for step, seconds in durations.items():
            metadata = _metadata(instance, step, partition)
            if step == "evaluation":
                evaluations[partition.split("|")[-1]] = metadata
            stages.append(
                Stage(
                    f"{step} [{partition.replace(shape + '|', '') if '|' in partition else partition}]",
                    seconds,
                    metadata.get("step_cpu_s"),
                    metadata.get("step_peak_rss_mb"),
                    metadata.get("step_estimated_peak_mb"),
                    _largest_file_read(step, instance, shape),
                )
            )
    return stages, evaluations


def _metadata(instance, step: str, partition: str) -> dict:
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(step), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records:
        return {}
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def _largest_file_read(step: str, instance, shape: str) -> int | None:
    if step == "float_reference":
        from edge_quant_pipeline.checkpoints.validate import weight_files

        folder = Path(_metadata(instance, "checkpoint", shape)["checkpoint_dir"])
        return sum(f.stat().st_size for f in weight_files(folder))
    if step in ("quantized_tflite", "evaluation"):  # both read the float file, the largest of those they read
        return Path(_metadata(instance, "float_tflite", shape)["tflite"]).stat().st_size
    return None


def runtime_prefill_tokens_per_s(home: Path, bench: Bench) -> dict[str, float]:
    """Each recipe's published file alone in the runtime, one after another on an otherwise idle machine."""
    speeds = {}
    for manifest in sorted((home / "artifacts" / bench.shape).glob("*/v-*/manifest.json")):
        recipe = manifest.parent.parent.name
        log = bench.root / f"profile-{recipe}.log"
        measured = run_measured(
            python("-m", "edge_quant_pipeline.evaluate.profile", str(manifest.parent / "model.tflite")),
            home,
            bench.env(),
            log,
        )
        if measured.status == 0:
            result = next(line for line in log.read_text().splitlines() if line.startswith("{"))
            prefill_ms = json.loads(result)["prefill_ms"]
            speeds[recipe] = 32 / prefill_ms * 1000  # the default prefill_len
    return speeds


def conversions(home: Path) -> int:
    import dagster as dg

    os.chdir(home)
    instance = dg.DagsterInstance.from_config(str(home))
    return len(instance.get_runs(filters=dg.RunsFilter(job_name="convert_checkpoint")))


# --- one shape ---------------------------------------------------------------------------------------------


def bench_shape(shape: str, root: Path, tasks: str, cap_mb: float, recipes: list[str]) -> None:
    from edge_quant_pipeline.checkpoints.validate import count_parameters, language_config, validate_checkpoint

    bench = Bench(root, shape, tasks)
    print(f"\n== {shape} ==", flush=True)
    bench.prepare()
    hf_config = validate_checkpoint(bench.checkpoint_dir)
    parameters = count_parameters(bench.checkpoint_dir, hf_config)
    checkpoint_bytes = sum(f.stat().st_size for f in bench.checkpoint_dir.glob("*.safetensors"))
    imports = bench.measure("imports", bench_export_child("imports"), REPO)
    float_file = root / "bare.tflite"
    chosen = this_script("bare_export_path", str(bench.checkpoint_dir))
    path = subprocess.run(chosen, capture_output=True, text=True, check=True, env=bench.env()).stdout.split()[-1]
    export = bench.measure(
        f"bare export ({path})",
        bench_export_child("export", path, str(bench.checkpoint_dir), str(float_file)),
        REPO,
        cap_mb=cap_mb,
    )
    quantize, bare_quantize_s = None, {}
    if not export.capped:
        timings = root / "bare_quantize.json"
        quantize = bench.measure(
            "bare quantize",
            this_script("bare_quantize", str(float_file), str(bench.home / "recipes.yaml"), str(timings)),
            root,
        )
        bare_quantize_s = json.loads(timings.read_text())
    for leftover in root.glob("bare*"):  # the float file and its embedders, or what a stopped export left
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    full = bench.measure("pipeline", edge_quant(shape, recipes), bench.home, ok=(0, 1))
    converted = conversions(bench.home)
    again = bench.measure("re-run", edge_quant(shape, recipes), bench.home, ok=(0, 1))
    reconversions = conversions(bench.home) - converted
    stages, evaluations = pipeline_stages(bench.home, shape)
    speeds = runtime_prefill_tokens_per_s(bench.home, bench)

    vocabulary = language_config(hf_config)["vocab_size"]
    print(
        f"\n### {shape}: {parameters / 1e6:.0f}M parameters, vocabulary {vocabulary:,}, "
        f"{checkpoint_bytes / 2**30:.2f} GB checkpoint (bfloat16); imports alone {imports.peak_tree_mb / GB:.2f} GB\n"
    )
    print("| stage | wall s | CPU s | peak RSS GB | largest process GB | estimate GB | bytes / parameter |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in ((f"bare export, {path}", export), ("bare quantize, all recipes", quantize)):
        if m is None:
            print(f"| {name} | | | | | | not run: no float file |")
            continue
        per_parameter = m.peak_tree_mb * 2**20 / parameters
        note = f", {stopped(m)}" if m.capped else ""
        print(
            f"| {name}{note} | {m.wall_s:.1f} | {m.cpu_s:.1f} | {m.peak_tree_mb / GB:.2f} | "
            f"{m.largest_process_mb / GB:.2f} | | {per_parameter:.1f} |"
        )
    for m, name in ((full, "pipeline: whole graph (tree)"), (again, "pipeline: re-run, nothing changed")):
        print(
            f"| {name} | {m.wall_s:.1f} | {m.cpu_s:.1f} | {m.peak_tree_mb / GB:.2f} | "
            f"{m.largest_process_mb / GB:.2f} | | {m.peak_tree_mb * 2**20 / parameters:.1f} |"
        )
    for s in stages:
        cells = [
            f"{s.cpu_s:.1f}" if s.cpu_s is not None else "",
            f"{s.peak_mb / GB:.2f}" if s.peak_mb else "",
            "",
            f"{s.estimate_mb / GB:.2f}" if s.estimate_mb else "",
            f"{s.peak_mb * 2**20 / parameters:.1f}" if s.peak_mb else "",
        ]
        print(f"| {s.name} | {s.seconds:.1f} | " + " | ".join(cells) + " |")

    print("\n| recipe | eval tokens / s (pipeline) | prefill tokens / s (runtime alone) | ratio | bare quantize s |")
    print("|---|---:|---:|---:|---:|")
    for recipe, metadata in sorted(evaluations.items()):
        eval_speed, runtime = metadata.get("eval_tokens_per_s", 0.0), speeds.get(recipe, 0.0)
        ratio = eval_speed / runtime if runtime else float("nan")
        print(f"| {recipe} | {eval_speed:.0f} | {runtime:.0f} | {ratio:.2f} | {bare_quantize_s.get(recipe, 0.0):.1f} |")

    outcomes = recipe_outcomes(bench.home, shape, root / "pipeline.log")
    print_targets(shape, export, full, again, reconversions, stages, evaluations, speeds, bare_quantize_s, outcomes)
    print_scale_targets(shape, parameters, imports, export, full, stages)


def recipe_outcomes(home: Path, shape: str, log: Path) -> dict[str, str]:
    """Per recipe: published, the reason recorded for it, or why ``edge-quant run`` did not start it (``log``: its
    summary, where a run not started is followed by its reason)."""
    outcomes = {}
    for folder in sorted(p for p in (home / "artifacts" / shape).iterdir() if p.is_dir()):
        failure = folder / "failed.json"
        published = list(folder.glob("v-*/manifest.json"))
        if published:
            outcomes[folder.name] = "published"
        elif failure.is_file():
            record = json.loads(failure.read_text())
            outcomes[folder.name] = f"failed ({record.get('stage')}): {record.get('error', '')[:100]}"
    lines = log.read_text().splitlines()
    for line, reason in zip(lines, [*lines[1:], ""], strict=True):
        if f"{shape}|" in line and line.rstrip().endswith("not run"):
            recipe = line.split(f"{shape}|", 1)[1].split()[0]
            outcomes.setdefault(recipe, f"not run: {reason.strip()[:160]}")
    return dict(sorted(outcomes.items()))


def print_targets(
    shape: str,
    export: Measurement,
    full: Measurement,
    again: Measurement,
    reconversions: int,
    stages: list[Stage],
    evaluations: dict,
    speeds: dict,
    bare_quantize_s: dict,
    outcomes: dict,
) -> None:
    recipes = sorted(evaluations)
    one_pass = {r: evaluations[r].get("eval_tokens", 0) / speeds[r] for r in recipes if speeds.get(r)}
    budget = export.wall_s + sum(bare_quantize_s.get(r, 0.0) + one_pass.get(r, 0.0) for r in recipes)
    limits = [(s.peak_mb / (4 * GB + 3 * s.reads_bytes / 2**20), s.name) for s in stages if s.peak_mb and s.reads_bytes]
    worst = max(limits) if limits else (0.0, "none")
    print(f"\nTargets ({shape}), measured:")
    print(f"  every recipe published or failed with its reason: {len(outcomes)} recipes")
    for recipe, outcome in outcomes.items():
        print(f"    {recipe}: {outcome}")
    if export.capped:
        print(f"  whole graph against the bare export: no ratio, the bare export was {stopped(export)}")
    else:
        print(
            f"  peak RSS of the process tree, whole graph / bare export: "
            f"{full.peak_tree_mb / export.peak_tree_mb:.2f}  (target <= 1.2)"
        )
    print(
        f"  peak RSS of each stage but the export / (4 GB + 3 x the largest model file it reads): "
        f"worst {worst[0]:.2f}, {worst[1]}  (target <= 1.0)"
    )
    if bare_quantize_s:
        print(
            f"  wall, whole graph / (bare export + the recipes' bare quantize + one eval pass each at the runtime's "
            f"prefill speed): {full.wall_s:.0f} s / {budget:.0f} s = {full.wall_s / budget:.2f}  (target <= 1.5)"
        )
    print(f"  re-run with nothing changed: {again.wall_s:.1f} s (target < 5), conversions: {reconversions} (target 0)")


def print_scale_targets(
    shape: str, parameters: int, imports: Measurement, export: Measurement, full: Measurement, stages: list[Stage]
) -> None:
    """Issue #29's: the whole tree under 20 GB, the export's step at most 5 bytes per parameter above the imports."""
    step = next((s for s in stages if s.name.startswith("float_tflite") and s.peak_mb), None)
    print(f"\nTargets ({shape}, issue #29), measured:")
    print(f"  peak RSS of the process tree, whole graph: {full.peak_tree_mb / GB:.2f} GB  (target < 20)")
    if step:
        above = (step.peak_mb - imports.peak_tree_mb) * 2**20 / parameters
        print(f"  the export step, bytes per parameter above the imports: {above:.1f}  (target <= 5)")
    bare = stopped(export) if export.capped else f"{export.wall_s:.0f} s, {export.peak_tree_mb / GB:.2f} GB"
    print(f"  the bare upstream export beside it: {bare}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help=f"default: {', '.join(DEFAULT_SHAPES)}")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (checkpoints, instance, files)")
    parser.add_argument("--recipe", action="append", default=[], help="the pipeline's recipes (default: every one)")
    parser.add_argument(
        "--tasks", default="none", help="EDGE_QUANT_TASKS for the pipeline (default none: random weights score nothing)"
    )
    parser.add_argument(
        "--memory-cap-gb",
        type=float,
        default=21.0,
        help="stop the bare export where its process tree passes this (default 21: before a 24 GB machine's OOM)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child](*args.args)
        return
    for shape in args.shape or DEFAULT_SHAPES:
        root = Path(tempfile.mkdtemp(prefix=f"edge-quant-scale-{shape}-"))
        try:
            bench_shape(shape, root, args.tasks, args.memory_cap_gb * GB, args.recipe)
        finally:
            if args.keep:
                print(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
