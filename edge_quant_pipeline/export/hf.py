"""A checkpoint exported with litert-torch's ``export_hf`` (transformers' own modeling code), in a child process.

``export_hf`` patches transformers' classes in place (its ``model_ext``), and the float reference of the same
checkpoint must be transformers' own model, wherever it runs next; a child process keeps the patches out of
the step's process, and hands the export's memory back to the machine when it exits. Run as a module, it is
that child:

    python -m edge_quant_pipeline.export.hf <checkpoint folder> <output folder> --prefill-len 32 --kv-cache-len 128

With ``--externalize-embedder`` (Gemma 4's per-layer embeddings need it), the embedding lookups are exported as
files of their own, which end up beside the model (``embedders.py``). The model is loaded as ``export/load.py``'s
``load_language_model`` loads it (no vision or audio tower, the per-layer table in the checkpoint's dtype), and the
per-layer embedder is written by ``lookup_table.py``, its table streamed to the file: litert-torch would convert it
from a float32 copy with its default conversion, 9.4 GB held several times over for Gemma 4 E2B.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_quant_pipeline.embedders import EMBEDDER_INPUTS, embedder_path, signature_for
from edge_quant_pipeline.export.child import child_done, child_failed, exported_by_child, start_child
from edge_quant_pipeline.export.load import load_language_model, per_layer_table
from edge_quant_pipeline.export.lookup_table import write_lookup_tflite
from edge_quant_pipeline.shapes import ExportSettings


def export_hf_tflite(
    checkpoint_dir: Path, settings: ExportSettings, output: Path, externalize_embedder: bool = False
) -> float:
    """Float32 prefill and decode signatures with the KV cache length of ``settings``, as
    ``generative.export_float_tflite`` writes them for the Generative API, and no LiteRT-LM bundle, at ``output``
    (its embedders beside it, with ``externalize_embedder``); returns the child's peak RSS in MB."""
    options = ["--externalize-embedder"] if externalize_embedder else []
    with exported_by_child("export_hf", __name__, checkpoint_dir, settings, output, *options) as (scratch, peak_mb):
        for role in EMBEDDER_INPUTS:  # before the model: a model file whose embedders are missing never exists
            if (scratch / f"{role}.tflite").exists():
                os.replace(scratch / f"{role}.tflite", embedder_path(output, role))
        os.replace(scratch / "model.tflite", output)
    return peak_mb


def main() -> None:
    parser = start_child(__doc__.splitlines()[0])
    parser.add_argument("--externalize-embedder", action="store_true")
    args = parser.parse_args()
    _dense_models_need_no_experts_kernel()
    from litert_torch.generative.export_hf import export

    tables = _load_as_the_pipeline_loads()
    try:
        _export(export, args)
        for table in tables:
            table.write(args.output_dir / "per_layer_embedder.tflite", args.prefill_len)
    except Exception as error:
        child_failed(error)
    child_done(args.output_dir)


def _export(export, args: argparse.Namespace) -> None:
    export.export(
        model=str(args.checkpoint_dir),
        output_dir=str(args.output_dir),
        prefill_lengths=[args.prefill_len],
        cache_length=args.kv_cache_len,
        quantization_recipe="none",  # None means its default, dynamic int8; the pipeline applies each recipe
        bundle_litert_lm=False,
        externalize_embedder=args.externalize_embedder,
        # Weights handed to MLIR as views of the torch tensors, not copies, and no constant folded: half the peak,
        # the same logits (benchmarks/bench_export.py).
        experimental_lightweight_conversion=True,
        keep_temporary_files=True,  # in output_dir, a scratch folder the parent removes
    )


@dataclass(frozen=True)
class _TakenTable:
    """A per-layer embedding table taken out of the model before the export, written as its embedder after."""

    weight: Any  # torch.Tensor, in the checkpoint's dtype
    scale: float
    rows_shape: tuple[int, int]  # (blocks, width per block)

    def write(self, output: Path, prefill_len: int) -> None:
        signatures = {signature_for("per_layer_embedder", n): n for n in (1, prefill_len)}
        write_lookup_tflite(self.weight, self.scale, self.rows_shape, signatures, output)


def _load_as_the_pipeline_loads() -> list[_TakenTable]:
    """litert-torch's load of the checkpoint replaced by ``load_language_model``, its per-layer embedding table
    taken out of the model (the exported graphs take its rows as inputs; torch.export would still lift the unused
    table into the graph, as a constant) and its own export of the per-layer embedder left out; returns the list
    the table goes into."""
    import torch
    import transformers
    from litert_torch.generative.export_hf.model_ext import exportables

    tables = []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def load(path, **kwargs):
        model = load_language_model(path, load=from_pretrained, **kwargs)
        if (table := per_layer_table(model)) is not None:
            text = model.config.get_text_config()
            rows = (text.num_hidden_layers, text.hidden_size_per_layer_input)
            tables.append(_TakenTable(table.weight.detach(), table.scalar_embed_scale, rows))
            table.weight = torch.nn.Parameter(torch.empty((0, table.weight.shape[1])), requires_grad=False)
        return model

    additional_exportables = exportables.get_additional_exportables

    def without_per_layer_embedder(config):
        return {k: v for k, v in additional_exportables(config).items() if k != "per_layer_embedder"}

    transformers.AutoModelForCausalLM.from_pretrained = load
    exportables.get_additional_exportables = without_per_layer_embedder
    return tables


def _dense_models_need_no_experts_kernel() -> None:
    """litert-torch 0.10 replaces Gemma 4's text model with its own class, from a module without transformers'
    ``@use_experts_implementation`` marker, and transformers 5.24 then refuses the ``grouped_mm`` experts
    kernel that the enclosing model asked for ("does not support setting experts implementation"). Such a class
    gets transformers' reference (``eager``) experts instead; the dense models exported here run none."""
    from transformers import modeling_utils

    check = modeling_utils.PreTrainedModel._check_and_adjust_experts_implementation

    def eager_where_it_cannot_be_set(model, requested):
        return check(model, requested) if type(model)._can_set_experts_implementation() else "eager"

    modeling_utils.PreTrainedModel._check_and_adjust_experts_implementation = eager_where_it_cannot_be_set


if __name__ == "__main__":
    main()
