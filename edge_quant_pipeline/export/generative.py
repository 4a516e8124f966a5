"""The Generative API rebuild's export: litert-torch's own layers (``architectures.py``) lowered to a float
``.tflite`` with prefill and decode signatures, once per checkpoint, in a child process (``child.py`` says why).
Run as a module, it is that child:

    python -m edge_quant_pipeline.export.generative <checkpoint folder> <output folder> --kv-cache-len 128
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_quant_pipeline.export.child import (
    child_done,
    child_failed,
    export_scratch,
    exported_by_child,
    start_child,
)
from edge_quant_pipeline.shapes import ExportSettings


def export_rebuilt_tflite(checkpoint_dir: Path, settings: ExportSettings, output: Path) -> float:
    """The checkpoint rebuilt from litert-torch's layers and exported to ``output`` by ``export_float_tflite``, in
    a child process; returns the child's peak RSS in MB."""
    with exported_by_child("litert-torch's Generative API", __name__, checkpoint_dir, settings, output) as (
        scratch,
        peak_mb,
    ):
        os.replace(scratch / "model.tflite", output)
    return peak_mb


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


def main() -> None:
    args = start_child(__doc__.splitlines()[0]).parse_args()
    from edge_quant_pipeline.checkpoints.validate import read_checkpoint
    from edge_quant_pipeline.export.load import architecture_of, load_float_model

    settings = ExportSettings(args.prefill_len, args.kv_cache_len)
    try:
        checkpoint = read_checkpoint(args.checkpoint_dir)
        model = load_float_model(checkpoint, settings.kv_cache_len)
        export_float_tflite(model, architecture_of(checkpoint).model_config, settings, args.output_dir / "model.tflite")
    except Exception as error:
        child_failed(error)
    child_done(args.output_dir)


if __name__ == "__main__":
    main()
