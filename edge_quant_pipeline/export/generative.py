"""The Generative API rebuild's export: litert-torch's own layers (``architectures.py``) lowered to a float
``.tflite`` with prefill and decode signatures, once per checkpoint, in a child process (``child.py`` says why)
unless the model is small enough for the step's own process. Run as a module, it is that child:

    python -m edge_quant_pipeline.export.generative <checkpoint folder> <output folder> --kv-cache-len 128
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_quant_pipeline.atomic import locked_scratch_beside
from edge_quant_pipeline.checkpoints.validate import Checkpoint, read_checkpoint
from edge_quant_pipeline.export.child import (
    ExportError,
    child_done,
    child_failed,
    error_line,
    exported_by_child,
    start_child,
)
from edge_quant_pipeline.shapes import ExportSettings

_EXPORTER = "litert-torch's Generative API"
# Below this many parameters (toy models: the demo has 0.8M) the export runs in the step's process, which imported
# litert-torch to plan it: the export takes seconds, of which a child's own import of litert-torch would be 5 more,
# and it leaves 0.15 GB in the process (147 MB for the demo; 186 MB for 16.9M parameters with a 262,144-token
# vocabulary, enough to lift tests/test_scale.py's float reference past its bound). Larger models export in a
# child, which hands everything back when it exits.
IN_PROCESS_PARAMETERS = 5_000_000


def export_rebuilt_tflite(checkpoint: Checkpoint, settings: ExportSettings, output: Path) -> float:
    """The checkpoint rebuilt from litert-torch's layers and exported to ``output`` by ``export_float_tflite``, here
    for a model of fewer than ``IN_PROCESS_PARAMETERS`` or in a child process; returns the child's peak RSS in MB
    (0 here: the step's own peak counts it)."""
    if 0 < checkpoint.parameters < IN_PROCESS_PARAMETERS:  # 0: not counted
        try:
            _export_checkpoint(checkpoint, settings, output)
        except Exception as error:
            raise ExportError(f"{_EXPORTER} could not export {checkpoint.path}: {error_line(error)}") from error
        return 0.0
    with exported_by_child(_EXPORTER, __name__, checkpoint.path, settings, output) as (scratch, peak_mb):
        os.replace(scratch / "model.tflite", output)
    return peak_mb


def _export_checkpoint(checkpoint: Checkpoint, settings: ExportSettings, output: Path) -> None:
    from edge_quant_pipeline.export.load import architecture_of, load_float_model

    model = load_float_model(checkpoint, settings.kv_cache_len)
    export_float_tflite(model, architecture_of(checkpoint).model_config, settings, output)


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
    with locked_scratch_beside(output) as scratch:
        signatures.convert(lightweight_conversion=lightweight).export(str(scratch / "model.tflite"))
        os.replace(scratch / "model.tflite", output)
    return output


def main() -> None:
    args = start_child(__doc__.splitlines()[0]).parse_args()
    try:
        settings = ExportSettings(args.prefill_len, args.kv_cache_len)
        _export_checkpoint(read_checkpoint(args.checkpoint_dir), settings, args.output_dir / "model.tflite")
    except Exception as error:
        child_failed(error)
    child_done(args.output_dir)


if __name__ == "__main__":
    main()
