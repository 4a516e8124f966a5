"""The pipeline against the bare toolchain, on the same machine, model and recipes, in one run.

From the checkpoint on disk to one quantized ``.tflite`` per recipe:

  (a)  bare script, litert-torch's convert once per recipe (what a user writes by hand)
  (b)  bare optimal script: export once, quantize the float flatbuffer per recipe
  (c)  the pipeline through Dagster, as a user launches it: ``edge-quant run --convert-only``
       on a fresh instance (the project's dagster.yaml), default workers (one per core)
  (c1) the same with ``--jobs 1``: what the second core buys
  (d)  the pipeline re-run with nothing changed (``edge-quant run`` after a full run)

Each variant runs in fresh processes, so import costs count. Peak RSS is the largest
sum of the resident memory of all the variant's processes (sampled every 20 ms);
CPU time is user + system of all of them. Then the full graph (``edge-quant run``:
evaluation, publishing and reports included), seconds per step and recipe.

    python benchmarks/bench_pipeline.py          # the bundled demo model

Real model sizes (135M to 0.5B parameters, bfloat16, real vocabularies) are ``bench_scale.py``'s.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from measure import run_measured

REPO = Path(__file__).resolve().parent.parent
RECIPES = ["float", "dynamic_int8", "weight_only_int8", "fp16", "dynamic_int4_block32", "dynamic_int4_block128"]
# litert-torch's names for the same recipes (generative.utilities.converter.QuantizationName)
UPSTREAM_FLAGS = {"float": "none", **{r: r for r in RECIPES[1:]}}


def _float_model(checkpoint_dir: Path):
    from edge_quant_pipeline.checkpoints.validate import read_checkpoint
    from edge_quant_pipeline.export.load import architecture_of, load_float_model
    from edge_quant_pipeline.shapes import ExportSettings

    checkpoint = read_checkpoint(checkpoint_dir)
    return load_float_model(checkpoint, ExportSettings.kv_cache_len), architecture_of(checkpoint).model_config


def bare_convert_per_recipe(checkpoint_dir: Path, out: Path) -> None:
    from litert_torch.generative.utilities import converter

    from edge_quant_pipeline.shapes import ExportSettings

    model, config = _float_model(checkpoint_dir)
    for recipe in RECIPES:
        converter.convert_to_tflite(
            model,
            str(out),
            recipe,
            ExportSettings.prefill_len,
            ExportSettings.kv_cache_len,
            quantize=UPSTREAM_FLAGS[recipe],
            config=config,
            export_config=converter.ExportConfig(output_logits_on_prefill=True),
        )


def bare_export_once(checkpoint_dir: Path, out: Path) -> None:
    from litert_torch.generative.utilities import converter
    from litert_torch.quantize import translate_recipe

    from edge_quant_pipeline.shapes import ExportSettings

    model, config = _float_model(checkpoint_dir)
    float_file = converter.convert_to_tflite(
        model,
        str(out),
        "float",
        ExportSettings.prefill_len,
        ExportSettings.kv_cache_len,
        quantize="none",
        config=config,
        export_config=converter.ExportConfig(output_logits_on_prefill=True),
    )
    float_bytes = Path(float_file).read_bytes()
    for recipe in RECIPES[1:]:
        quant_config = converter.get_quant_recipe_from_flag(UPSTREAM_FLAGS[recipe], config)
        rules = translate_recipe.translate_to_ai_edge_recipe(quant_config.generative_recipe)
        (out / f"{recipe}.tflite").write_bytes(bytes(translate_recipe.quantize_model(float_bytes, rules)))


def edge_quant(*args: str) -> list[str]:
    """The command line as a user runs it (`edge-quant run ...`), in the variant's folder."""
    return [sys.executable, "-m", "edge_quant_pipeline.cli", "run", *args, *(f"--recipe={r}" for r in RECIPES)]


# variant -> (what it is, a function of this script run in a fresh process, or a command line)
VARIANTS = {
    "a": ("bare: convert per recipe", bare_convert_per_recipe),
    "b": ("bare: export once, quantize per recipe", bare_export_once),
    "c": ("pipeline: edge-quant run --convert-only", edge_quant("--convert-only")),
    "c1": ("pipeline: the same, --jobs 1", edge_quant("--convert-only", "--jobs", "1")),
    "full": ("pipeline: edge-quant run, full graph", edge_quant()),
    "d": ("pipeline: edge-quant run again, no change", edge_quant()),
}


def measure(variant: str, checkpoint_dir: Path, workdir: Path, recipes_yaml: str) -> dict:
    """Run one variant in a fresh process (``measure.run_measured``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", workdir / "dagster.yaml")  # the instance a user gets
    (workdir / "recipes.yaml").write_text(recipes_yaml)
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DAGSTER_HOME": str(workdir),
        "EDGE_QUANT_CHECKPOINT_DIR": str(checkpoint_dir.parent),
        "EDGE_QUANT_ARTIFACT_DIR": str(workdir / "artifacts"),
        "EDGE_QUANT_WORK_DIR": str(workdir / "work"),
        "EDGE_QUANT_RECIPES": str(workdir / "recipes.yaml"),
    }
    work = VARIANTS[variant][1]
    command = (
        work if isinstance(work, list) else [sys.executable, __file__, "--variant", variant, str(checkpoint_dir), "."]
    )
    measured = run_measured(command, workdir, env, workdir / f"{variant}.log")
    if measured.status != 0:
        raise SystemExit(f"variant {variant} failed:\n{(workdir / f'{variant}.log').read_text()[-3000:]}")
    return {
        "variant": variant,
        "what": VARIANTS[variant][0],
        "wall_s": measured.wall_s,
        "cpu_s": measured.cpu_s,
        "peak_rss_mb": measured.peak_tree_mb,
        "largest_process_mb": measured.largest_process_mb,
    }


def step_seconds(dagster_home: Path) -> dict[str, dict[str, float]]:
    """Per partition, seconds of each step, from the STEP_SUCCESS events in the variant's instance."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.chdir(dagster_home)  # the project's dagster.yaml has paths relative to where Dagster starts
    instance = dg.DagsterInstance.get()
    steps: dict[str, dict[str, float]] = {}
    for run in reversed(instance.get_runs()):
        partition = run.tags.get("dagster/partition", "")
        for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS):
            event = record.dagster_event
            steps.setdefault(partition, {})[event.step_key] = event.event_specific_data.duration_ms / 1000
    return steps


def print_results(rows: list[dict], params: float, steps: dict[str, dict[str, float]]) -> None:
    by = {r["variant"]: r for r in rows}
    print(f"\n{'variant':<7} {'what':<44} {'wall s':>7} {'CPU s':>7} {'peak RSS MB':>12} {'largest MB':>11}")
    for r in rows:
        print(
            f"{r['variant']:<7} {r['what']:<44} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} "
            f"{r['peak_rss_mb']:12.0f} {r['largest_process_mb']:11.0f}"
        )

    def ratio(x: str, y: str, key: str = "wall_s") -> float:
        return by[x][key] / by[y][key]

    print(f"\n(c)/(b) wall {ratio('c', 'b'):.2f}  (target <= 1.3)")
    print(f"(c)/(a) wall {ratio('c', 'a'):.2f}  (target <= 0.5)")
    print(f"(d)/(c) wall {ratio('d', 'c'):.2f}  (target <= 0.1)")
    print(f"peak RSS (c)/(b) {ratio('c', 'b', 'peak_rss_mb'):.2f}  (target <= 1.5)")
    print(f"(c1)/(b) wall {ratio('c1', 'b'):.2f}  (one worker: the cost of orchestration without the second core)")
    for variant in ("b", "c", "full"):
        per_parameter = by[variant]["peak_rss_mb"] * 2**20 / params
        print(f"peak RSS per parameter ({variant}): {per_parameter:.1f} bytes ({params / 1e6:.1f} M parameters)")
    print("\nFull graph, seconds per step (from the Dagster step events of run 'full'):")
    for partition, stepmap in steps.items():
        print(f"  {partition:<44} " + "  ".join(f"{s} {t:.2f}" for s, t in stepmap.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process
        VARIANTS[args.variant][1](*args.paths)
        return

    root = Path(tempfile.mkdtemp(prefix="edge-quant-bench-"))
    try:
        from edge_quant_pipeline.checkpoints.validate import count_parameters
        from edge_quant_pipeline.settings import DEMO_CHECKPOINT_DIR

        checkpoint_dir = root / "checkpoints" / "tiny-llama-bytes"
        shutil.copytree(DEMO_CHECKPOINT_DIR / "tiny-llama-bytes", checkpoint_dir)
        config = json.loads((checkpoint_dir / "config.json").read_text())
        params = count_parameters(checkpoint_dir, config)
        print(
            f"model: {checkpoint_dir.name} ({config['model_type']}, {params / 1e6:.1f} M parameters); "
            f"recipes: {', '.join(RECIPES)}"
        )
        recipes_yaml = "recipes: {}\n"  # only the built-in recipes
        rows = [measure(v, checkpoint_dir, root / v, recipes_yaml) for v in ("a", "b", "c", "c1", "full")]
        rows.append(measure("d", checkpoint_dir, root / "full", recipes_yaml))  # the same instance as "full"
        print_results(rows, params, step_seconds(root / "full"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
