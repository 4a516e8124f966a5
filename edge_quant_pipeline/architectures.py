"""Hugging Face ``config.json`` -> litert-torch model config, per model family.

litert-torch rebuilds a checkpoint from its own layers (``DecoderOnlyModel``)
and needs a ``ModelConfig`` describing them plus a map from the checkpoint's
tensor names to its own. This module derives both from the ``config.json``
that ``transformers`` writes. Only the Llama family is mapped so far; every
other ``model_type`` gets an error that lists what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

SUPPORTED_MODEL_TYPES = ("llama",)


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's ``model_type`` has no mapping to litert-torch layers."""


@dataclass(frozen=True)
class Architecture:
    """What litert-torch needs to rebuild one checkpoint."""

    model_config: Any  # litert_torch.generative.layers.model_config.ModelConfig
    tensor_names: Any  # litert_torch.generative.utilities.loader.ModelLoader.TensorNames

    @property
    def tied_lm_head(self) -> bool:
        return bool(self.model_config.lm_head_share_weight_with_embedding)

    @property
    def shape(self) -> "ModelShape":
        config = self.model_config
        attention = config.block_config(0).attn_config
        return ModelShape(
            num_layers=config.num_layers,
            tied_lm_head=self.tied_lm_head,
            reduction_dims={
                "embedding": (config.embedding_dim,),
                "attention": (config.embedding_dim, attention.num_heads * attention.head_dim),
                "feedforward": (config.embedding_dim, config.block_config(0).ff_config.intermediate_size),
                "lm_head": (config.embedding_dim,),
            },
        )


@dataclass(frozen=True)
class ModelShape:
    """What recipe validation needs to know about a model, without torch."""

    num_layers: int
    tied_lm_head: bool
    # per component, the input (reduction) sizes of its weights: int4 blocks run along them
    reduction_dims: dict[str, tuple[int, ...]]


def rope_theta(hf_config: dict[str, Any]) -> float:
    """transformers >= 5 nests it under ``rope_parameters``; older versions do not."""
    nested = hf_config.get("rope_parameters") or {}
    return float(nested.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def _llama(hf_config: dict[str, Any]) -> Architecture:
    from litert_torch.generative.layers import model_config as cfg
    from litert_torch.generative.utilities import model_builder

    num_heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    norm = cfg.NormalizationConfig(
        type=cfg.NormalizationType.RMS_NORM, epsilon=hf_config.get("rms_norm_eps", 1e-6)
    )
    block = cfg.TransformerBlockConfig(
        attn_config=cfg.AttentionConfig(
            num_heads=num_heads,
            head_dim=hf_config.get("head_dim") or hidden // num_heads,
            num_query_groups=hf_config.get("num_key_value_heads", num_heads),
            rotary_base=rope_theta(hf_config),
            rotary_percentage=1.0,
            qkv_use_bias=hf_config.get("attention_bias", False),
            output_proj_use_bias=hf_config.get("attention_bias", False),
        ),
        ff_config=cfg.FeedForwardConfig(
            type=cfg.FeedForwardType.GATED,
            activation=cfg.ActivationConfig(cfg.ActivationType.SILU),
            intermediate_size=hf_config["intermediate_size"],
            use_bias=hf_config.get("mlp_bias", False),
        ),
        pre_attention_norm_config=norm,
        post_attention_norm_config=norm,
    )
    tied = hf_config.get("tie_word_embeddings", False)
    model_config = cfg.ModelConfig(
        vocab_size=hf_config["vocab_size"],
        num_layers=hf_config["num_hidden_layers"],
        max_seq_len=hf_config.get("max_position_embeddings", 2048),
        embedding_dim=hidden,
        block_configs=block,
        final_norm_config=norm,
        lm_head_share_weight_with_embedding=tied,
    )
    names = model_builder.TENSOR_NAMES if tied else model_builder.TENSOR_NAMES_WITH_SEPARATE_LM_HEAD
    return Architecture(model_config=model_config, tensor_names=names)


_BUILDERS: dict[str, Callable[[dict[str, Any]], Architecture]] = {"llama": _llama}


def architecture_for(hf_config: dict[str, Any], config_path: Path) -> Architecture:
    model_type = hf_config.get("model_type")
    builder = _BUILDERS.get(model_type)
    if builder is None:
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "Convert the checkpoint to one of these families, or add a mapping in "
            "edge_quant_pipeline/architectures.py."
        )
    try:
        return builder(hf_config)
    except KeyError as missing:
        raise UnsupportedArchitectureError(
            f"{config_path}: config.json lacks the field {missing} that a {model_type!r} model needs."
        ) from None
