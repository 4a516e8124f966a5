"""LiteRT-LM's XNNPACK weight cache, by where it is kept, on one bundle: load and generate in a fresh process per
mode, and print its time, peak RSS (and the anonymous and file-backed parts at the end) and the disk it wrote.

    python benchmarks/bench_weight_cache.py <model.litertlm>

``disk`` is the runtime's default (a file beside the bundle; here in a scratch folder); ``:memory`` is what
``evaluate/litert_lm.py`` uses; ``:nocache`` packs the weights per signature.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("disk", ":memory", ":nocache")
PROMPTS = ("The quick brown fox", "Once upon a time")


def _status_gb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 2**20
    return fields


def generate(bundle: str, mode: str, scratch: str) -> None:
    """The child: an engine with the weight cache in ``mode``, two prompts, 32 greedy tokens each."""
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    started = time.perf_counter()
    cache = scratch if mode == "disk" else mode
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
        memory = _status_gb()
    print(time.perf_counter() - started, memory["VmHWM"], memory["RssAnon"], memory["RssFile"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # mode, scratch folder
    args = parser.parse_args()
    if args.child:
        generate(args.bundle, *args.child)
        return
    print(f"{'mode':<9} {'load + generate s':>18} {'peak GB':>8} {'anon GB':>8} {'file GB':>8} {'disk MB':>8}")
    for mode in MODES:
        scratch = tempfile.mkdtemp(dir=Path(args.bundle).parent, prefix=".weight-cache-")
        try:
            command = [sys.executable, __file__, args.bundle, "--child", mode, scratch]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
            disk_mb = sum(f.stat().st_size for f in Path(scratch).iterdir()) / 2**20
        finally:
            shutil.rmtree(scratch)
        seconds, peak, anon, file = map(float, out[-4:])
        print(f"{mode:<9} {seconds:18.1f} {peak:8.2f} {anon:8.2f} {file:8.2f} {disk_mb:8.0f}")


if __name__ == "__main__":
    main()
