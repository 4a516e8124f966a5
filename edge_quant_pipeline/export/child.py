"""Exports run in a child process, by both exporters (``generative.py``, ``hf.py``; the Generative API's of a model
below ``generative.IN_PROCESS_PARAMETERS`` in the step's process).

The step's process never holds what an export of a real model allocates: litert-torch keeps most of its peak after
the export returns (measured in one process, a Qwen2.5-0.5B shape through the Generative API: 3.3 GB resident after the
export, 1.2 GB of it imports, not given back by a collection nor ``malloc_trim``; about 13 GB after a Llama 3.2
3B shape's, beside which the float bundle's LiteRT-LM check took the machine to 21.5 GB). A child hands it all
back to the machine when it exits, and its peak is measured apart (the step's metadata counts it).

The parent side is ``exported_by_child``; the child side begins with ``start_child`` and ends with ``child_done``
or ``child_failed``: the child's last line on stderr is then its error, which the parent reports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_quant_pipeline.atomic import locked_scratch_beside
from edge_quant_pipeline.memory import peak_rss_mb
from edge_quant_pipeline.processes import die_with_parent
from edge_quant_pipeline.shapes import ExportSettings

_STATS = "export_stats.json"


class ExportError(RuntimeError):
    """litert-torch could not export the checkpoint."""


def error_line(error: BaseException) -> str:
    """``TypeName: the message's first line``: what a user reads of an exception from deep inside a library."""
    message = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {message[:400]}"


@contextmanager
def exported_by_child(
    exporter: str, module: str, checkpoint_dir: Path, settings: ExportSettings, output: Path, *options: str
) -> Iterator[tuple[Path, float]]:
    """``python -m <module> <checkpoint_dir> <scratch> --prefill-len .. --kv-cache-len .. <options>`` run to its
    end, its output passed on to the step's log; yields the scratch folder beside ``output`` holding what it wrote
    (removed after) and the child's peak RSS in MB, or raises ``ExportError`` with the child's own last word."""
    with locked_scratch_beside(output) as scratch:
        command = [sys.executable, "-m", module, str(checkpoint_dir), str(scratch)]
        command += ["--prefill-len", str(settings.prefill_len), "--kv-cache-len", str(settings.kv_cache_len), *options]
        returncode, last_line = _run_showing_progress(command)
        if returncode < 0:
            raise ExportError(
                f"{exporter} of {checkpoint_dir} was killed by {signal.Signals(-returncode).name} "
                "(the kernel's out-of-memory killer, or a person); nothing was written."
            )
        if returncode != 0:
            raise ExportError(f"{exporter} could not export {checkpoint_dir}: {last_line or 'no error message'}")
        yield scratch, json.loads((scratch / _STATS).read_text())["peak_rss_mb"]


def _run_showing_progress(command: list[str]) -> tuple[int, str]:
    """Run the child with its output passed on to this process's (the step's log), line by line; returns its
    exit code and the last line it wrote to stderr (an exception's message, when it fails)."""
    last_line = ""
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace") as child:
        for line in child.stderr:
            sys.stderr.write(line)
            last_line = line.strip() or last_line
    return child.returncode, last_line


def start_child(description: str) -> argparse.ArgumentParser:
    """What every export child does first: it ends with the step's process (an export whose worker was killed, by
    the OOM killer or a person, must not go on holding the machine's memory for nobody), and it takes the arguments
    ``exported_by_child`` passes (add its own options to the parser returned)."""
    die_with_parent()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--prefill-len", type=int, default=ExportSettings.prefill_len)
    parser.add_argument("--kv-cache-len", type=int, default=ExportSettings.kv_cache_len)
    return parser


def child_done(output_dir: Path) -> None:
    (output_dir / _STATS).write_text(json.dumps({"peak_rss_mb": peak_rss_mb()}))
    sys.stdout.flush()
    os._exit(0)  # without torch's and TensorFlow's teardown, seconds that buy nothing


def child_failed(error: BaseException) -> None:
    """Any failure of the export: its traceback, then one line for the parent."""
    traceback.print_exc()
    sys.stderr.write(f"{error_line(error)}\n")
    sys.stderr.flush()
    os._exit(1)  # no teardown, whose output would come after the line the parent reads
