"""XNNPACK's weight cache, by where it is kept: a LiteRT-LM bundle loaded and generating in LiteRT-LM, or a
``.tflite`` in the pipeline's interpreter session (a prefill and 27 decode steps), in a fresh process per mode;
prints the time, the peak RSS (and the anonymous, file-backed and shared parts at the end) and the disk written.

    python benchmarks/bench_weight_cache.py <model.litertlm or model.tflite>

``disk`` is the runtimes' default use of a cache (a file; here in a scratch folder); ``:memory`` is what
``evaluate/litert_lm.py`` and ``runtime/session.py`` use; ``:nocache`` (LiteRT-LM) and ``""`` (the interpreter)
keep none, and pack the weights per signature.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {".litertlm": ("disk", ":memory", ":nocache"), ".tflite": ("disk", ":memory", "")}
PROMPTS = ("The quick brown fox", "Once upon a time")


def _status_gb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0]) / 2**20
    return fields


def generate(bundle: str, cache: str) -> None:
    """An engine with the weight cache at ``cache``, two prompts, 32 greedy tokens each."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with litert_lm.Engine(bundle, backend=litert_lm.Backend.CPU(), max_num_tokens=128, cache_dir=cache) as engine:
        for prompt in PROMPTS:
            session = engine.create_session(
                apply_prompt_template=False,
                sampler_config=litert_lm.SamplerConfig(top_k=1),
                max_output_tokens=32,
            )
            session.run_prefill([prompt])
            session.run_decode()
            session.close()


def interpret(tflite: str, cache: str) -> None:
    """The pipeline's interpreter session with its weight cache at ``cache``: a prefill and 27 decode steps."""
    import numpy as np

    from edge_quant_pipeline.runtime import session
    from edge_quant_pipeline.shapes import ExportSettings

    session.WEIGHT_CACHE = cache
    settings = ExportSettings()
    with session.InterpreterSession(Path(tflite), settings, 2) as model:
        model.prefill(np.arange(settings.prefill_len, dtype=np.int32))
        for position in range(settings.prefill_len, settings.prefill_len + 27):
            model.decode(1, position)


def child(model: str, mode: str, scratch: str) -> None:
    started = time.perf_counter()
    if model.endswith(".litertlm"):
        generate(model, scratch if mode == "disk" else mode)  # LiteRT-LM's cache_dir is a folder
    else:
        interpret(model, str(Path(scratch) / "weights") if mode == "disk" else mode)  # the interpreter's, a file
    memory = _status_gb()
    print(time.perf_counter() - started, *(memory[k] for k in ("VmHWM", "RssAnon", "RssFile", "RssShmem")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # mode, scratch folder
    args = parser.parse_args()
    if args.child:
        child(args.model, *args.child)
        return
    print(f"{'mode':<9} {'load + run s':>13} {'peak GB':>8} {'anon GB':>8} {'file GB':>8} {'shm GB':>7} {'disk MB':>8}")
    for mode in MODES[Path(args.model).suffix]:
        scratch = tempfile.mkdtemp(dir=Path(args.model).parent, prefix=".weight-cache-")
        try:
            command = [sys.executable, __file__, args.model, "--child", mode, scratch]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
            disk_mb = sum(f.stat().st_size for f in Path(scratch).iterdir()) / 2**20
        finally:
            shutil.rmtree(scratch)
        seconds, peak, anon, file, shared = map(float, out[-5:])
        print(f"{mode or '(none)':<9} {seconds:13.1f} {peak:8.2f} {anon:8.2f} {file:8.2f} {shared:7.2f} {disk_mb:8.0f}")


if __name__ == "__main__":
    main()
