"""Which of litert-torch's two exporters turns a checkpoint into a float ``.tflite``.

- ``generative_api``: litert-torch rebuilds the model from its own layers (``architectures.py``) and
  ``converter.convert_to_tflite`` exports it. Its prefill returns logits for every position, so evaluation
  scores a chunk per call.
- ``export_hf``: ``litert_torch.generative.export_hf`` exports transformers' own modeling code, patched
  where the runtime needs it. It covers the families the rebuild does not, and configs the rebuild refuses
  (a RoPE scaling its layers lack). Its signatures take a ``mask`` input and its prefill returns no logits.

``auto`` (the default) takes the rebuild where it accepts the config and ``export_hf`` otherwise, for the
model types ``export_hf`` is proven on here (``tests/test_export_hf.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_quant_pipeline.architectures import (
    SUPPORTED_MODEL_TYPES,
    ModelShape,
    UnsupportedArchitectureError,
    architecture_for,
)

GENERATIVE_API, EXPORT_HF, AUTO = "generative_api", "export_hf", "auto"
EXPORTER_CHOICES = (AUTO, GENERATIVE_API, EXPORT_HF)
# Proven through export_hf here: a tiny random model of each, written by transformers, exported, run in the
# interpreter against transformers' own logits, and quantized with a whole-model and a selective recipe.
EXPORT_HF_MODEL_TYPES = ("llama", "qwen3", "gemma3_text", "smollm3", "ministral3")


class ExporterSettingError(ValueError):
    """The exporter setting names no exporter."""


@dataclass(frozen=True)
class ExportPlan:
    exporter: str
    shape: ModelShape


# What either exporter needs of config.json; a config without one is broken whichever exporter takes it.
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _transformers_default(hf_config: dict[str, Any], field: str) -> Any:
    """A field config.json leaves out, as transformers fills it in for this model type (export_hf runs its model)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(hf_config["model_type"]), field)


def export_hf_shape(hf_config: dict[str, Any]) -> ModelShape:
    """The model's shape as recipe validation needs it, from config.json (transformers' own layer sizes)."""
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    tied = bool(hf_config.get("tie_word_embeddings", _transformers_default(hf_config, "tie_word_embeddings")))
    return ModelShape(
        num_layers=hf_config["num_hidden_layers"],
        tied_lm_head=tied,
        reduction_dims={
            "embedding": (hidden,),
            "attention": (hidden, heads * head_dim),
            "feedforward": (hidden, hf_config["intermediate_size"]),
            "lm_head": (hidden,),
        },
    )


def plan_export(hf_config: dict[str, Any], config_path: Path, exporter: str = AUTO) -> ExportPlan:
    """The exporter for this checkpoint (``exporter`` pins one), or ``UnsupportedArchitectureError`` saying why
    neither takes it."""
    if exporter not in EXPORTER_CHOICES:
        raise ExporterSettingError(
            f"EDGE_QUANT_EXPORTER={exporter!r} names no exporter; use one of {', '.join(EXPORTER_CHOICES)}."
        )
    model_type = hf_config.get("model_type")
    missing = [name for name in _REQUIRED_FIELDS if name not in hf_config]
    if missing:
        raise UnsupportedArchitectureError(
            f"{config_path}: config.json lacks the field {missing[0]!r} that a {model_type!r} model needs."
        )
    if exporter != EXPORT_HF:
        try:
            return ExportPlan(GENERATIVE_API, architecture_for(hf_config, config_path).shape)
        except UnsupportedArchitectureError:
            # the rebuild's own reason is the useful one for a family it knows, unless export_hf takes over
            known_only_to_the_rebuild = model_type in SUPPORTED_MODEL_TYPES and model_type not in EXPORT_HF_MODEL_TYPES
            if exporter == GENERATIVE_API or known_only_to_the_rebuild:
                raise
    if model_type not in EXPORT_HF_MODEL_TYPES:
        pinned = " with EDGE_QUANT_EXPORTER=export_hf" if exporter == EXPORT_HF else ""
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported{pinned}. "
            f"The Generative API rebuild takes: {', '.join(SUPPORTED_MODEL_TYPES)}; export_hf (as proven here): "
            f"{', '.join(EXPORT_HF_MODEL_TYPES)}. Convert the checkpoint to one of these families, or add one "
            "(README, Adding a checkpoint)."
        )
    return ExportPlan(EXPORT_HF, export_hf_shape(hf_config))
