"""litert-torch's export paths on a real model shape, side by side in one run: time, peak memory, bytes per
parameter above the imports, and whether each path's float file gives the default path's logits.

For a shape of ``edge_quant_pipeline.synthetic.SHAPES``, a checkpoint with random bfloat16 weights of the
published config is written by ``transformers`` (never committed); then, each in a fresh process:

  imports              torch, TensorFlow and litert-torch imported, nothing exported (the fixed cost)
  generative           the Generative API rebuild exported as the pipeline does (``export/generative.py``: the
                       signatures of ``converter.convert_to_tflite``), litert-torch's default conversion
  generative_light     the same with ``lightweight_conversion=True``, as the pipeline exports
  export_hf            ``litert_torch.generative.export_hf.export`` with its defaults but no quantization
  export_hf_light      the same with ``experimental_lightweight_conversion=True``
  pipeline_hf          the pipeline's ``export_hf`` child (``export/hf.py``): lightweight conversion, a multimodal
                       checkpoint's towers not loaded, a per-layer embedding table kept in the checkpoint's dtype
                       and streamed to its file (Gemma 4 E2B)
  logits               each lightweight file against its exporter's default file: one window of random
                       tokens through the interpreter, the largest absolute logit difference

For a checkpoint with per-layer embeddings, every ``export_hf`` path externalizes the embedders, as LiteRT-LM
runs them. A path whose process tree passes ``--memory-cap-gb`` (21 GB) is stopped there and reported with the
time it took to get there, before the kernel's OOM killer picks a process on a 24 GB machine.

    python benchmarks/bench_export.py --shape qwen2.5-0.5b
    python benchmarks/bench_export.py --shape llama3.2-1b --path generative_light --path export_hf_light
    python benchmarks/bench_export.py --shape gemma4-e2b --path pipeline_hf --path export_hf_light --path export_hf
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from measure import run_measured

REPO = Path(__file__).resolve().parent.parent
PATHS = ("generative", "generative_light", "export_hf", "export_hf_light", "pipeline_hf")
REFERENCES = {"generative_light": "generative", "export_hf_light": "export_hf", "pipeline_hf": "export_hf"}
GB = 1024


# --- the children, each run in a fresh process through this file ---------------------------------------


def imports() -> None:
    import litert_torch.generative.export_hf.export  # noqa: F401
    import litert_torch.generative.utilities.converter  # noqa: F401
    import tensorflow  # noqa: F401
    import torch  # noqa: F401


def export(path: str, checkpoint_dir: str, output: str) -> None:
    from edge_quant_pipeline.checkpoints.validate import read_checkpoint, validate_checkpoint
    from edge_quant_pipeline.export import hf
    from edge_quant_pipeline.export.exporters import per_layer_embeddings
    from edge_quant_pipeline.export.generative import export_float_tflite
    from edge_quant_pipeline.export.load import architecture_of, load_float_model
    from edge_quant_pipeline.shapes import ExportSettings

    settings, folder = ExportSettings(), Path(output).parent / path
    externalize = per_layer_embeddings(validate_checkpoint(Path(checkpoint_dir)))
    if path == "pipeline_hf":
        hf.export_hf_tflite(Path(checkpoint_dir), settings, Path(output), externalize_embedder=externalize)
        return
    if path.startswith("export_hf"):
        from litert_torch.generative.export_hf import export

        export.export(
            model=checkpoint_dir,
            output_dir=str(folder),
            prefill_lengths=[settings.prefill_len],
            cache_length=settings.kv_cache_len,
            quantization_recipe="none",
            bundle_litert_lm=False,
            externalize_embedder=externalize,
            experimental_lightweight_conversion=path.endswith("_light"),
        )
        _take_files(folder, Path(output))
        return
    checkpoint = read_checkpoint(Path(checkpoint_dir))
    model = load_float_model(checkpoint, settings.kv_cache_len)
    config = architecture_of(checkpoint).model_config
    export_float_tflite(model, config, settings, Path(output), lightweight=path.endswith("_light"))


def _take_files(folder: Path, output: Path) -> None:
    """The model and its embedders, named as the pipeline names them beside a model (``embedders.py``)."""
    from edge_quant_pipeline.embedders import EMBEDDER_INPUTS, embedder_path

    for role in EMBEDDER_INPUTS:
        if found := next(folder.rglob(f"{role}.tflite"), None):
            found.rename(embedder_path(output, role))
    next(folder.rglob("model.tflite")).rename(output)


def logits(candidate: str, reference: str) -> None:
    import numpy as np

    from edge_quant_pipeline.runtime.session import InterpreterSession
    from edge_quant_pipeline.shapes import ExportSettings

    settings = ExportSettings()
    scored = []
    for tflite in (candidate, reference):
        with InterpreterSession(Path(tflite), settings, num_threads=2) as session:
            tokens = np.random.default_rng(0).integers(0, 1000, settings.kv_cache_len, dtype=np.int32)
            scored.append(session.score(tokens))
    print(f"max_abs_logit_difference={np.abs(scored[0] - scored[1]).max():.3g}")


CHILDREN = {"imports": imports, "export": export, "logits": logits}


# --- measuring ---------------------------------------------------------------------------------------------


def child(name: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--child", name, *args]


def measured(name: str, command: list[str], root: Path, cap_mb: float | None = None):
    result = run_measured(command, REPO, {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, root / f"{name}.log", cap_mb)
    if result.capped:
        stopped = f"stopped at {result.peak_tree_mb / GB:.2f} GB after {result.wall_s:.0f} s (the memory cap)"
        print(f"  {name}: {stopped}", flush=True)
    elif result.status != 0:
        tail = (root / f"{name}.log").read_text()[-1500:]
        print(f"  {name}: failed ({result.status}) at {result.peak_tree_mb / GB:.2f} GB peak:\n{tail}", flush=True)
    else:
        print(
            f"  {name}: {result.wall_s:.0f} s, {result.peak_tree_mb / GB:.2f} GB peak at {result.peak_at_s:.0f} s",
            flush=True,
        )
    return result


def bench(shape: str, paths: list[str], root: Path, cap_mb: float) -> None:
    from edge_quant_pipeline.checkpoints.validate import count_parameters, validate_checkpoint

    checkpoint = root / shape
    print(f"{shape}: writing the checkpoint ...", flush=True)
    if measured("checkpoint", [sys.executable, "-m", "edge_quant_pipeline.synthetic", shape, str(root)], root).status:
        raise SystemExit("could not write the checkpoint")
    parameters = count_parameters(checkpoint, validate_checkpoint(checkpoint))
    base = measured("imports", child("imports"), root)
    rows = []
    for path in paths:
        result = measured(path, child("export", path, str(checkpoint), str(root / f"{path}.tflite")), root, cap_mb)
        rows.append((path, result))
    differences = {}
    for path in paths:
        default = REFERENCES.get(path, path)
        if path != default and (root / f"{path}.tflite").exists() and (root / f"{default}.tflite").exists():
            log = root / f"logits-{path}.log"
            files = (str(root / f"{path}.tflite"), str(root / f"{default}.tflite"))
            run_measured(child("logits", *files), REPO, dict(os.environ), log)
            found = [line for line in log.read_text().splitlines() if line.startswith("max_abs_logit_difference=")]
            differences[path] = found[-1].split("=")[1] if found else "failed"

    print(f"\n{shape}: {parameters / 1e9:.3f}B parameters; imports alone {base.peak_tree_mb / GB:.2f} GB")
    header = f"{'path':<18} {'wall s':>7} {'peak GB':>8} {'B/param above imports':>22} {'file GB':>8}"
    print(f"{header}  max |Δlogit| vs default")
    for path, result in rows:
        file = root / f"{path}.tflite"
        size = f"{file.stat().st_size / 2**30:.2f}" if file.exists() else "-"
        per_parameter = (result.peak_tree_mb - base.peak_tree_mb) * 2**20 / parameters
        status = " (stopped at the memory cap)" if result.capped else "" if result.status == 0 else " (failed)"
        print(
            f"{path:<18} {result.wall_s:>7.0f} {result.peak_tree_mb / GB:>8.2f} {per_parameter:>22.1f} {size:>8}  "
            f"{differences.get(path, '')}{status}"
        )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        CHILDREN[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--path", action="append", choices=PATHS, help=f"default: {', '.join(PATHS)}")
    parser.add_argument("--keep", type=Path, help="a folder to work in and keep (default: a temporary one)")
    parser.add_argument(
        "--memory-cap-gb",
        type=float,
        default=21.0,
        help="stop a path whose process tree passes this (default 21: a 24 GB machine, before its OOM killer)",
    )
    args = parser.parse_args()
    cap_mb = args.memory_cap_gb * GB
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        bench(args.shape, args.path or list(PATHS), args.keep, cap_mb)
        return
    with tempfile.TemporaryDirectory() as root:
        bench(args.shape, args.path or list(PATHS), Path(root), cap_mb)


if __name__ == "__main__":
    main()
