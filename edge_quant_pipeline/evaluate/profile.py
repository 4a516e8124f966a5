"""Latency and peak memory of a ``.tflite`` in the LiteRT interpreter, measured in a fresh process.

A separate process is the only way to see the interpreter's own peak RSS: the evaluating
process holds the float reference and Dagster. It imports just numpy and ai-edge-litert
(about 0.1 s), so the measurement costs little.

    python -m edge_quant_pipeline.evaluate.profile model.tflite --prefill-len 32 --kv-cache-len 128 --threads 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.memory import peak_rss_mb
from edge_quant_pipeline.processes import die_with_parent, last_word
from edge_quant_pipeline.runtime.session import InterpreterSession, RuntimeRejectedError
from edge_quant_pipeline.shapes import ExportSettings

PREFILL_REPEATS = 5
DECODE_RUNS, DECODE_TOKENS = 5, 32  # each run decodes up to 32 tokens after the prompt, as a short reply does


@dataclass(frozen=True)
class RuntimeProfile:
    """Warm (the first call of each signature is not timed), the median of several runs, and their spread:
    (slowest - fastest) / median, so a number is read against its noise."""

    prefill_ms: float
    prefill_spread: float
    decode_tokens_per_s: float
    decode_spread: float
    peak_rss_mb: float  # of the whole interpreter process, Python included


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def profile(tflite: Path, settings: ExportSettings, num_threads: int) -> RuntimeProfile:
    prompt = np.zeros(settings.prefill_len, np.int32)
    with InterpreterSession(tflite, settings, num_threads) as session:
        session.prefill(prompt)  # warm-up: first calls allocate buffers
        prefill_seconds = []
        for _ in range(PREFILL_REPEATS):
            started = time.perf_counter()
            session.prefill(prompt)
            prefill_seconds.append(time.perf_counter() - started)
        session.decode(0, settings.prefill_len)  # warm-up of the decode signature, which has its own first-call cost
        positions = range(
            settings.prefill_len + 1, min(settings.prefill_len + 1 + DECODE_TOKENS, settings.kv_cache_len)
        )
        decode_rates = []
        for _ in range(DECODE_RUNS):
            started = time.perf_counter()
            for pos in positions:
                session.decode(0, pos)
            decode_rates.append(len(positions) / (time.perf_counter() - started))
    return RuntimeProfile(
        prefill_ms=1000 * statistics.median(prefill_seconds),
        prefill_spread=_spread(prefill_seconds),
        decode_tokens_per_s=statistics.median(decode_rates),
        decode_spread=_spread(decode_rates),
        peak_rss_mb=peak_rss_mb(),
    )


def profile_in_subprocess(tflite: Path, settings: ExportSettings, num_threads: int) -> RuntimeProfile:
    command = [
        sys.executable,
        "-m",
        "edge_quant_pipeline.evaluate.profile",
        str(tflite),
        "--prefill-len",
        str(settings.prefill_len),
        "--kv-cache-len",
        str(settings.kv_cache_len),
        "--threads",
        str(num_threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeRejectedError(f"LiteRT failed to profile {tflite}: {last_word(done.stderr, done.returncode)}")
    return RuntimeProfile(**json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tflite", type=Path)
    parser.add_argument("--prefill-len", type=int, default=ExportSettings.prefill_len)
    parser.add_argument("--kv-cache-len", type=int, default=ExportSettings.kv_cache_len)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        result = profile(args.tflite, ExportSettings(args.prefill_len, args.kv_cache_len), args.threads)
    except RuntimeRejectedError as error:  # its message last, where the parent reads it (not a plugin's warning)
        sys.stderr.write(f"{error}\n")
        sys.stderr.flush()
        os._exit(1)
    print(json.dumps(asdict(result)), flush=True)
    os._exit(0)  # without the teardown, in which LiteRT logs the end of its accelerators


if __name__ == "__main__":
    main()
