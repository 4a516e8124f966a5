"""Quantization algorithms and the recipe search, measured through the pipeline, on the demo model and on a
real-shaped checkpoint, in one run per model.

For each model, on a fresh instance and store, ``edge-quant run`` with:

  dynamic_int8, dynamic_int4_block32      the built-in recipes (min-max rounding, what litert-torch does)
  int4_block32_gptq                       int4 blocks of 32, GPTQ on every fully-connected layer (the embedding,
                                          which GPTQ does not handle, min-max)
  int4_block32_hadamard                   int4 blocks of 32 on Hadamard-rotated weights
  int4_block32_octav                      int4 blocks of 32, OCTAV clipping
  static_int8, static_int8_a16            int8 weights and static int8 (int16) activations on every
                                          fully-connected layer, calibrated; the embedding int8 dynamic
  fp16, weight_only_int8                  built in, for the "every catalog recipe" comparison

then a second ``edge-quant run`` adding ``kl_budget``, a search recipe whose budget is the geometric mean of
dynamic_int8's and dynamic_int4_block32's measured mean KL, over int8_dynamic, int4_dynamic_block32 and
int4_dynamic_block32+gptq. It prints the comparison table (sizes, KL mean and p99, top-1, perplexity ratio) and the
issue #18 targets: the searched recipe within its budget in its own evaluation, its weights at least 10% smaller
than dynamic_int8's and smaller than every catalog recipe that meets the budget, and the search's wall time as a
multiple of one recipe's full evaluation.

    python benchmarks/bench_algorithms.py                       # the demo model, then smollm2-135m
    python benchmarks/bench_algorithms.py --model demo

The real-shaped checkpoint has random weights (``edge_quant_pipeline.synthetic``): its quality numbers compare
algorithms on the same weights, not what a trained model would score. Gates are set to pass for the fixed recipes
(random weights), so that every recipe reaches publishing.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINTS = REPO / "edge_quant_pipeline" / "demo" / "checkpoints"
FIXED_RECIPES = """\
gates: {max_perplexity_ratio: 1000, min_top1_agreement: 0}
recipes:
  int4_block32_gptq: {default: int4_dynamic_block32+gptq, embedding: int4_dynamic_block32}
  int4_block32_hadamard: {default: int4_dynamic_block32+hadamard}
  int4_block32_octav: {default: int4_dynamic_block32+octav}
  static_int8: {default: int8_static_a8, embedding: int8_dynamic}
  static_int8_a16: {default: int8_static_a16, embedding: int8_dynamic}
"""
BUILT_IN = ["float", "dynamic_int8", "weight_only_int8", "fp16", "dynamic_int4_block32"]
FIXED = [
    *BUILT_IN,
    "int4_block32_gptq",
    "int4_block32_hadamard",
    "int4_block32_octav",
    "static_int8",
    "static_int8_a16",
]
SEARCH_CANDIDATES = ["int8_dynamic", "int4_dynamic_block32", "int4_dynamic_block32+gptq"]


def edge_quant_run(home: Path, env: dict[str, str], recipes: list[str]) -> float:
    command = [sys.executable, "-m", "edge_quant_pipeline.cli", "run"]
    for recipe in recipes:
        command += ["--recipe", recipe]
    started = time.perf_counter()
    with (home / "runs.log").open("a") as log:
        status = subprocess.run(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if status not in (0, 1):  # 1: some recipe failed, which the table shows with its reason
        raise SystemExit(f"edge-quant run failed ({status}); see {home / 'runs.log'}")
    return time.perf_counter() - started


def manifests(store: Path, model: str) -> dict[str, dict]:
    found = {}
    for path in sorted((store / model).glob("*/v-*/manifest.json")):
        manifest = json.loads(path.read_text())
        found[manifest["recipe"]] = manifest
    return found


def step_seconds(home: Path, step: str, partition: str) -> float:
    """The duration of the latest successful ``step`` of ``partition``, from the instance's event log."""
    import dagster as dg

    cwd = Path.cwd()
    os.chdir(home)  # dagster.yaml's storage paths are relative to where Dagster starts
    try:
        instance = dg.DagsterInstance.from_config(str(home))
        for run in instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": partition})):
            for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS):
                if record.dagster_event.step_key == step:
                    return record.dagster_event.event_specific_data.duration_ms / 1000
        return float("nan")
    finally:
        os.chdir(cwd)


def print_table(found: dict[str, dict], recipes: list[str]) -> None:
    float_weights = found["float"]["metrics"]["weight_bytes"] if "float" in found else None
    print("| recipe | file MB | weights MB | weights x | ppl / float | mean KL | p99 KL | top-1 agree |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for recipe in recipes:
        if recipe not in found:
            print(f"| {recipe} | not published |||||||")
            continue
        m = found[recipe]["metrics"]
        ratio = float_weights / m["weight_bytes"] if float_weights else float("nan")
        print(
            f"| {recipe} | {m['file_bytes'] / 1e6:.3f} | {m['weight_bytes'] / 1e6:.3f} | {ratio:.2f} | "
            f"{m['perplexity_ratio']:.4f} | {m['mean_kl']:.5f} | {m['p99_kl']:.4f} | {m['top1_agreement']:.3f} |"
        )


def bench(model: str, root: Path) -> None:
    print(f"\n== {model} ==", flush=True)
    home = root / "pipeline"
    home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", home)
    if model == "demo":
        checkpoints, model_id = DEMO_CHECKPOINTS, "tiny-llama-bytes"
    else:
        checkpoints, model_id = root / "checkpoints", model
        synthetic = [sys.executable, "-m", "edge_quant_pipeline.synthetic", model, str(checkpoints)]
        subprocess.run(synthetic, cwd=root, check=True)
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DAGSTER_HOME": str(home),
        "EDGE_QUANT_CHECKPOINT_DIR": str(checkpoints),
        "EDGE_QUANT_ARTIFACT_DIR": str(home / "artifacts"),
        "EDGE_QUANT_WORK_DIR": str(home / "work"),
        "EDGE_QUANT_RECIPES": str(home / "recipes.yaml"),
    }
    (home / "recipes.yaml").write_text(FIXED_RECIPES)
    fixed_s = edge_quant_run(home, env, FIXED)
    found = manifests(home / "artifacts", model_id)
    kl8, kl4 = (found[r]["metrics"]["mean_kl"] for r in ("dynamic_int8", "dynamic_int4_block32"))
    budget = float(f"{math.sqrt(kl8 * kl4):.3g}")
    search = {"max_mean_kl": budget, "schemes": SEARCH_CANDIDATES}
    (home / "recipes.yaml").write_text(FIXED_RECIPES + f"  kl_budget:\n    search: {json.dumps(search)}\n")
    search_s = edge_quant_run(home, env, ["kl_budget"])
    found = manifests(home / "artifacts", model_id)

    print(f"\nfixed recipes: {fixed_s:.0f} s; the search recipe's run: {search_s:.0f} s\n")
    print_table(found, [*FIXED, "kl_budget"])
    searched = found.get("kl_budget")
    if searched is None:
        failure = home / "artifacts" / model_id / "kl_budget" / "failed.json"
        print(f"\nkl_budget was not published: {failure.read_text() if failure.exists() else 'no record'}")
        return
    trace, metrics = searched["search"], searched["metrics"]
    int8_weights = found["dynamic_int8"]["metrics"]["weight_bytes"]
    meeting = [r for r in FIXED if r in found and found[r]["metrics"]["mean_kl"] <= budget]
    smallest = min(meeting, key=lambda r: found[r]["metrics"]["weight_bytes"]) if meeting else None
    partition = f"{model_id}|kl_budget"
    resolve_s = step_seconds(home, "resolved_recipe", partition)
    evaluation_s = step_seconds(home, "evaluation", f"{model_id}|dynamic_int8")
    chosen = trace["rounds"][-1]["assignment"]
    counts = {s: sum(1 for v in chosen.values() if v == s) for s in SEARCH_CANDIDATES}
    print(f"\nSearch: budget max_mean_kl {budget:g} = sqrt({kl8:.5f} x {kl4:.5f}); chose {counts}")
    print("  rounds (target, predicted, verified, weight MB): ", end="")
    print(
        "; ".join(
            f"{r['target']:.4g}, {r['predicted']:.4g}, {r['verified']:.4g}, {r['weight_bytes'] / 1e6:.3f}"
            for r in trace["rounds"]
        )
    )
    print(
        f"  passes: {trace['quantize_passes']} quantize, {trace['scoring_passes']} scoring "
        f"({trace['cached_sensitivities']} cached); search {trace['seconds']:.0f} s, "
        f"resolved_recipe step {resolve_s:.0f} s"
    )
    print(f"\nTargets ({model}), measured:")
    within = metrics["mean_kl"] <= budget
    print(f"  searched mean KL in its own evaluation {metrics['mean_kl']:.5f} <= budget {budget:g}: {within}")
    print(
        f"  weights vs dynamic_int8: {metrics['weight_bytes'] / 1e6:.3f} / {int8_weights / 1e6:.3f} MB = "
        f"{metrics['weight_bytes'] / int8_weights:.3f} (target <= 0.90)"
    )
    if smallest:
        smallest_bytes = found[smallest]["metrics"]["weight_bytes"]
        print(
            f"  catalog recipes within the budget: {', '.join(meeting)}; the smallest, {smallest}, "
            f"{smallest_bytes / 1e6:.3f} MB: searched smaller: {metrics['weight_bytes'] < smallest_bytes}"
        )
    print(
        f"  search wall time / one full evaluation (dynamic_int8's evaluation step, {evaluation_s:.1f} s): "
        f"{resolve_s / evaluation_s:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="demo or a shape of edge_quant_pipeline.synthetic")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (instance, store, files)")
    args = parser.parse_args()
    for model in args.model or ["demo", "smollm2-135m"]:
        root = Path(tempfile.mkdtemp(prefix=f"edge-quant-algorithms-{model}-"))
        try:
            bench(model, root)
        finally:
            if args.keep:
                print(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
