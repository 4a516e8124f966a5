"""Hugging Face ``config.json`` -> litert-torch model config, per model family.

litert-torch rebuilds a checkpoint from its own layers and needs a
``ModelConfig`` describing them, a map from the checkpoint's tensor names to its
own, and the model class that wires the layers together (its generic
``DecoderOnlyModel`` unless a family orders norms or masks differently). This
module derives all three from the ``config.json`` that ``transformers`` writes.
A config that a family's litert-torch layers would compute differently from
``transformers`` (a RoPE scaling other than Llama 3's and LongRoPE, an attention scale other
than ``1/sqrt(head_dim)``, ...) is refused with the reason rather than rebuilt into a different
model; ``exporters.py`` then decides whether ``export_hf`` takes it instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_quant_pipeline.export.hf_config import (
    UnsupportedArchitectureError,
    head_dim,
    layer_types,
    max_positions,
    partial_rotary,
    plain_rope_base,
    positions,
    require,
    rope_theta,
)
from edge_quant_pipeline.shapes import ModelShape


@dataclass(frozen=True)
class Architecture:
    """What litert-torch needs to rebuild one checkpoint."""

    model_config: Any  # litert_torch.generative.layers.model_config.ModelConfig
    tensor_names: Any  # litert_torch.generative.utilities.loader.ModelLoader.TensorNames
    model_class: Any  # the torch.nn.Module subclass build_decoder_only_model instantiates

    @property
    def tied_lm_head(self) -> bool:
        return bool(self.model_config.lm_head_share_weight_with_embedding)

    @property
    def shape(self) -> ModelShape:
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


def _rms_norm(hf_config: dict[str, Any], zero_centered: bool = False):
    from litert_torch.generative.layers import model_config as cfg

    return cfg.NormalizationConfig(
        type=cfg.NormalizationType.RMS_NORM, epsilon=hf_config["rms_norm_eps"], zero_centered=zero_centered
    )


# gelu_new is Phi's name for the tanh approximation
_ACTIVATIONS = {"silu": "SILU", "gelu": "GELU", "gelu_pytorch_tanh": "GELU_TANH", "gelu_new": "GELU_TANH"}


def _activation(name: str):
    from litert_torch.generative.layers import model_config as cfg

    require(name in _ACTIVATIONS, f"activation {name!r} is not supported ({', '.join(_ACTIVATIONS)}).")
    return cfg.ActivationConfig(cfg.ActivationType[_ACTIVATIONS[name]])


def _gated_feedforward(hf_config: dict[str, Any], activation: str, **family: Any):
    from litert_torch.generative.layers import model_config as cfg

    return cfg.FeedForwardConfig(
        type=cfg.FeedForwardType.GATED,
        activation=_activation(activation),
        intermediate_size=hf_config["intermediate_size"],
        use_bias=hf_config.get("mlp_bias", False),
        **family,
    )


def _attention(hf_config: dict[str, Any], rotary_base: float | None = None, **family: Any):
    """``rotary_base`` is given only by families whose layers differ in it (Gemma 3); the RoPE scaling
    of the others is checked by their family (``hf_config.positions``)."""
    from litert_torch.generative.layers import model_config as cfg

    num_heads = hf_config["num_attention_heads"]
    bias = hf_config.get("attention_bias", False)
    fields = dict(
        num_heads=num_heads,
        head_dim=head_dim(hf_config),
        num_query_groups=hf_config.get("num_key_value_heads") or num_heads,
        rotary_base=rope_theta(hf_config) if rotary_base is None else rotary_base,
        rotary_percentage=1.0,
        qkv_use_bias=bias,
        output_proj_use_bias=bias,
        # One layout for all families: all q heads, then all k, then all v. It is what the separate
        # q/k/v projections concatenate to and what Phi-3's fused qkv_proj stores, and splitting
        # per head before the q/k norms is what Qwen 3's and Gemma 3's per-head norms need.
        qkv_transpose_before_split=True,
        qkv_fused_interleaved=False,
    )
    return cfg.AttentionConfig(**{**fields, **family})


_HF_TENSOR_NAMES = dict(
    ff_up_proj="model.layers.{}.mlp.up_proj",
    ff_down_proj="model.layers.{}.mlp.down_proj",
    ff_gate_proj="model.layers.{}.mlp.gate_proj",
    attn_query_proj="model.layers.{}.self_attn.q_proj",
    attn_key_proj="model.layers.{}.self_attn.k_proj",
    attn_value_proj="model.layers.{}.self_attn.v_proj",
    attn_output_proj="model.layers.{}.self_attn.o_proj",
    pre_attn_norm="model.layers.{}.input_layernorm",
    post_attn_norm="model.layers.{}.post_attention_layernorm",
    embedding="model.embed_tokens",
    final_norm="model.norm",
)
_QK_NORM_NAMES = dict(
    attn_query_norm="model.layers.{}.self_attn.q_norm", attn_key_norm="model.layers.{}.self_attn.k_norm"
)
_FF_NORM_NAMES = dict(
    pre_ff_norm="model.layers.{}.pre_feedforward_layernorm", post_ff_norm="model.layers.{}.post_feedforward_layernorm"
)


def _architecture(
    hf_config: dict[str, Any],
    blocks: Any,
    final_norm: Any,
    model_class: Any,
    *,
    tied_default: bool,
    names: dict[str, str],
    **model_fields: Any,
) -> Architecture:
    """``tied_default`` is the family's transformers default, for configs that omit ``tie_word_embeddings``."""
    from litert_torch.generative.layers import model_config as cfg
    from litert_torch.generative.utilities import loader

    tied = bool(hf_config.get("tie_word_embeddings", tied_default))
    model_config = cfg.ModelConfig(
        vocab_size=hf_config["vocab_size"],
        num_layers=hf_config["num_hidden_layers"],
        embedding_dim=hf_config["hidden_size"],
        block_configs=blocks,
        final_norm_config=final_norm,
        lm_head_share_weight_with_embedding=tied,
        **model_fields,
    )
    tensor_names = loader.ModelLoader.TensorNames(
        **{**_HF_TENSOR_NAMES, "lm_head": None if tied else "lm_head", **names}
    )
    return Architecture(model_config=model_config, tensor_names=tensor_names, model_class=model_class)


def _pre_norm_family(
    hf_config: dict[str, Any],
    *,
    attention: dict[str, Any] | None = None,
    feedforward: Any = None,
    names: dict[str, str] | None = None,
    zero_centered: bool = False,
    tied_default: bool = False,
    **model_fields: Any,
) -> Architecture:
    """Llama, Qwen 2/3, Gemma and Phi-3: a norm before attention and before feedforward, global attention."""
    from litert_torch.generative.layers import model_config as cfg
    from litert_torch.generative.utilities import model_builder

    norm = _rms_norm(hf_config, zero_centered)
    block = cfg.TransformerBlockConfig(
        attn_config=_attention(hf_config, **(attention or {})),
        ff_config=feedforward or _gated_feedforward(hf_config, hf_config.get("hidden_act", "silu")),
        pre_attention_norm_config=norm,
        post_attention_norm_config=norm,
    )
    return _architecture(
        hf_config,
        block,
        norm,
        model_builder.DecoderOnlyModel,
        tied_default=tied_default,
        names=names or {},
        **{**positions(hf_config), **model_fields},
    )


def _llama(hf_config: dict[str, Any]) -> Architecture:
    return _pre_norm_family(hf_config)


def _qwen2(hf_config: dict[str, Any]) -> Architecture:
    return _pre_norm_family(hf_config, attention=dict(qkv_use_bias=True, output_proj_use_bias=False))


def _qwen3(hf_config: dict[str, Any]) -> Architecture:
    norm = _rms_norm(hf_config)
    return _pre_norm_family(
        hf_config, attention=dict(query_norm_config=norm, key_norm_config=norm), names=_QK_NORM_NAMES
    )


def _phi3(hf_config: dict[str, Any]) -> Architecture:
    from litert_torch.generative.layers import model_config as cfg

    require(hf_config.get("hidden_act", "silu") == "silu", "Phi-3's fused gate_up_proj is rebuilt as SiLU-GLU only.")
    # gate_up_proj holds [gate; up]: one linear layer whose SiLU-GLU activation splits it the same way.
    feedforward = cfg.FeedForwardConfig(
        type=cfg.FeedForwardType.SEQUENTIAL,
        activation=cfg.ActivationConfig(cfg.ActivationType.SILU_GLU),
        intermediate_size=hf_config["intermediate_size"],
    )
    return _pre_norm_family(
        hf_config,
        attention=dict(rotary_percentage=partial_rotary(hf_config)),
        feedforward=feedforward,
        # the loader reads the fused qkv_proj whenever it is named; a sequential feedforward reads up and down only
        names=dict(
            attn_fused_qkv_proj="model.layers.{}.self_attn.qkv_proj", ff_up_proj="model.layers.{}.mlp.gate_up_proj"
        ),
    )


def _phi(hf_config: dict[str, Any]) -> Architecture:
    """Phi-1, 1.5 and 2 (litert-torch's ``examples/phi/phi2.py``): attention and feedforward side by side
    on one LayerNorm, biases everywhere, partial RoPE."""
    from litert_torch.generative.examples.phi import phi2
    from litert_torch.generative.layers import model_config as cfg

    require(not hf_config.get("qk_layernorm"), "qk_layernorm is not supported.")
    require(not hf_config.get("tie_word_embeddings"), "a tied LM head (which has its own bias) is not supported.")
    norm = cfg.NormalizationConfig(type=cfg.NormalizationType.LAYER_NORM, epsilon=hf_config["layer_norm_eps"])
    block = cfg.TransformerBlockConfig(
        attn_config=_attention(
            hf_config, rotary_percentage=partial_rotary(hf_config), qkv_use_bias=True, output_proj_use_bias=True
        ),
        ff_config=cfg.FeedForwardConfig(
            type=cfg.FeedForwardType.SEQUENTIAL,
            activation=_activation(hf_config.get("hidden_act", "gelu_new")),
            intermediate_size=hf_config["intermediate_size"],
            use_bias=True,
        ),
        pre_attention_norm_config=norm,
        parallel_residual=True,
    )
    names = dict(
        ff_up_proj="model.layers.{}.mlp.fc1",
        ff_down_proj="model.layers.{}.mlp.fc2",
        attn_output_proj="model.layers.{}.self_attn.dense",
        post_attn_norm=None,
        final_norm="model.final_layernorm",
    )
    return _architecture(
        hf_config,
        block,
        norm,
        phi2.Phi2,
        tied_default=False,
        names=names,
        lm_head_use_bias=True,
        **positions(hf_config),
    )


def _gemma_embedding_scale(hf_config: dict[str, Any]) -> float:
    """Every Gemma multiplies the token embeddings by sqrt(hidden_size)."""
    return hf_config["hidden_size"] ** 0.5


def _gemma(hf_config: dict[str, Any]) -> Architecture:
    activation = hf_config.get("hidden_act", "gelu_pytorch_tanh")
    if activation == "gelu":  # transformers reads this legacy value of the first Gemma releases as tanh-GELU
        activation = "gelu_pytorch_tanh"
    return _pre_norm_family(
        hf_config,
        feedforward=_gated_feedforward(hf_config, activation),
        zero_centered=True,
        tied_default=True,
        embedding_scale=_gemma_embedding_scale(hf_config),
    )


def _sandwich_norm_family(
    hf_config: dict[str, Any],
    model_class: Any,
    sliding_pattern: int,
    per_layer_attention: Callable[[str], dict[str, Any]],
    names: dict[str, str],
    **model_fields: Any,
) -> Architecture:
    """Gemma 2 and 3: norms before and after both attention and feedforward, local and global layers."""
    from litert_torch.generative.layers import model_config as cfg

    head_size, scalar = head_dim(hf_config), hf_config.get("query_pre_attn_scalar", 256)
    # transformers scales attention scores by query_pre_attn_scalar**-0.5, litert-torch by head_dim**-0.5
    require(scalar == head_size, f"query_pre_attn_scalar {scalar} differs from head_dim {head_size}.")
    require(not hf_config.get("use_bidirectional_attention"), "bidirectional attention is not supported.")
    require(
        hf_config.get("tie_word_embeddings", True),
        "litert-torch's Gemma 2/3 models always share the embedding with the LM head.",
    )
    norm = _rms_norm(hf_config, zero_centered=True)
    feedforward = _gated_feedforward(
        hf_config,
        hf_config.get("hidden_activation", "gelu_pytorch_tanh"),
        pre_ff_norm_config=norm,
        post_ff_norm_config=norm,
    )

    def block(layer_type: str):
        sliding = layer_type == "sliding_attention"
        attention = _attention(
            hf_config,
            logit_softcap=hf_config.get("attn_logit_softcapping"),
            sliding_window_size=hf_config["sliding_window"],
            attn_type=cfg.AttentionType.LOCAL_SLIDING if sliding else cfg.AttentionType.GLOBAL,
            **per_layer_attention(layer_type),
        )
        return cfg.TransformerBlockConfig(
            attn_config=attention,
            ff_config=feedforward,
            pre_attention_norm_config=norm,
            post_attention_norm_config=norm,
        )

    return _architecture(
        hf_config,
        [block(t) for t in layer_types(hf_config, sliding_pattern)],
        norm,
        model_class,
        tied_default=True,
        names={**_FF_NORM_NAMES, **names},
        max_seq_len=max_positions(hf_config),
        embedding_scale=_gemma_embedding_scale(hf_config),
        **model_fields,
    )


def _gemma2(hf_config: dict[str, Any]) -> Architecture:
    from litert_torch.generative.examples.gemma import gemma2

    return _sandwich_norm_family(
        hf_config,
        gemma2.Gemma2,
        sliding_pattern=2,
        per_layer_attention=lambda _: dict(rotary_base=plain_rope_base(hf_config)),
        names={},
        final_logit_softcap=hf_config.get("final_logit_softcapping"),
    )


_GEMMA3_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def _gemma3_text(hf_config: dict[str, Any]) -> Architecture:
    from litert_torch.generative.examples.gemma3 import decoder

    require(hf_config.get("final_logit_softcapping") is None, "litert-torch's Gemma 3 applies no final logit softcap.")
    norm = _rms_norm(hf_config, zero_centered=True)

    def per_layer(layer_type: str) -> dict[str, Any]:
        return dict(
            rotary_base=plain_rope_base(hf_config, layer_type, _GEMMA3_DEFAULT_THETA[layer_type]),
            query_norm_config=norm,
            key_norm_config=norm,
        )

    return _sandwich_norm_family(
        hf_config, decoder.Decoder, sliding_pattern=6, per_layer_attention=per_layer, names=_QK_NORM_NAMES
    )


_BUILDERS: dict[str, Callable[[dict[str, Any]], Architecture]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "phi": _phi,
    "phi3": _phi3,
}
SUPPORTED_MODEL_TYPES = tuple(_BUILDERS)


def architecture_for(hf_config: dict[str, Any], config_path: Path) -> Architecture:
    model_type = hf_config.get("model_type")
    builder = _BUILDERS.get(model_type)
    if builder is None:
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "Convert the checkpoint to one of these families, or add a mapping in "
            "edge_quant_pipeline/export/architectures.py."
        )
    try:
        return builder(hf_config)
    except KeyError as missing:
        raise UnsupportedArchitectureError(
            f"{config_path}: config.json lacks the field {missing} that a {model_type!r} model needs."
        ) from None
    except UnsupportedArchitectureError as reason:
        raise UnsupportedArchitectureError(
            f"{config_path}: this {model_type!r} model cannot be rebuilt: {reason}"
        ) from None
