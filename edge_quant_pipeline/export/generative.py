"""The Generative API rebuild's export: litert-torch's own layers (``architectures.py``) lowered to a float
``.tflite`` with prefill and decode signatures, once per checkpoint."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_quant_pipeline.shapes import ExportSettings


@contextmanager
def export_scratch(output: Path) -> Iterator[Path]:
    """A hidden folder beside ``output`` for litert-torch, which picks its own file names, locked while in use.
    Scratch folders whose lock is free were left by killed exports (an export's partial files can be as large
    as the model), so they are removed first; a concurrent export's folder is locked and stays."""
    pattern = f".{output.name}.tmp-*"
    for stale in output.parent.glob(pattern):
        try:
            with (stale / ".lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(stale)
        except OSError:  # BlockingIOError: in use; FileNotFoundError: another run removed it first
            continue
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=pattern[:-1]) as scratch:
        with (Path(scratch) / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield Path(scratch)


def export_float_tflite(
    model: Any, model_config: Any, settings: ExportSettings, output: Path, lightweight: bool = True
) -> Path:
    """Export prefill and decode signatures (external KV cache, logits on prefill).

    ``lightweight``: litert-torch's lightweight conversion, which hands the weights to MLIR as views of the torch
    tensors instead of copies and folds no constants: the same file and logits for a fraction of the memory
    (``benchmarks/bench_export.py`` measures both)."""
    from litert_torch._convert.interface import Converter
    from litert_torch.generative.utilities import converter

    signatures = Converter()
    # convert_to_tflite's own signatures (prefill with logits, decode); it takes no lightweight option itself.
    converter._add_signatures(
        signatures,
        model,
        prefill_seq_lens=[settings.prefill_len],
        kv_cache_max_len=settings.kv_cache_len,
        pixel_values_size=None,
        pixel_seq_len=0,
        config=model_config,
        loras=[None],
        # Logits on prefill let evaluation score every position of the eval text.
        export_config=converter.ExportConfig(output_logits_on_prefill=True),
    )
    with export_scratch(output) as scratch:
        signatures.convert(lightweight_conversion=lightweight).export(str(scratch / "model.tflite"))
        os.replace(scratch / "model.tflite", output)
    return output
