"""What the Generative API rebuild reads from a ``config.json`` beyond its plain fields: the head size, the
positions a model attends over and their RoPE (nested under ``rope_parameters`` since transformers 5, at the top
level before), the local/global layer pattern; and the error for a value litert-torch's layers would compute
differently from ``transformers``."""

from __future__ import annotations

import math
from functools import partial
from typing import Any


class UnsupportedArchitectureError(ValueError):
    """litert-torch's layers cannot rebuild the checkpoint: its ``model_type`` has no mapping to them, or a config
    value would be computed differently from ``transformers``."""


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise UnsupportedArchitectureError(reason)


def rope_parameters(hf_config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """transformers >= 5 nests RoPE settings under ``rope_parameters``, per layer type for Gemma 3."""
    params = hf_config.get("rope_parameters") or {}
    return params.get(layer_type, params) if layer_type else params


def rope_theta(hf_config: dict[str, Any], layer_type: str | None = None, default: float = 10000.0) -> float:
    """Older configs keep it at the top level; Gemma 3's local layers there as ``rope_local_base_freq``."""
    legacy_key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
    return float(rope_parameters(hf_config, layer_type).get("rope_theta", hf_config.get(legacy_key, default)))


def _rope_type(hf_config: dict[str, Any], layer_type: str | None = None) -> str:
    params = rope_parameters(hf_config, layer_type) or hf_config.get("rope_scaling") or {}
    return params.get("rope_type", params.get("type", "default"))


def plain_rope_base(hf_config: dict[str, Any], layer_type: str | None = None, default: float = 10000.0) -> float:
    """For families whose litert-torch layers compute plain RoPE only: scaled variants would change every logit."""
    rope_type = _rope_type(hf_config, layer_type)
    require(rope_type == "default", f"RoPE scaling {rope_type!r} is not supported, only plain RoPE.")
    return rope_theta(hf_config, layer_type, default)


SCALED_ROPE_TYPES = ("llama3", "longrope")


def _rope_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` fields for the config's RoPE: none for plain RoPE."""
    rope_type = _rope_type(hf_config)
    if rope_type == "default":
        return {}
    require(
        rope_type in SCALED_ROPE_TYPES,
        f"RoPE scaling {rope_type!r} is not supported, only plain RoPE, {' and '.join(SCALED_ROPE_TYPES)}.",
    )
    return _scaled_rope(hf_config, rope_type)


def _scaled_rope(hf_config: dict[str, Any], rope_type: str) -> dict[str, Any]:
    """``ModelConfig`` fields for the RoPE scalings litert-torch's own examples build: Llama 3.1/3.2's
    (``examples/llama``) and Phi-3.5/4-mini's LongRoPE (``examples/phi``), with the config's factors."""
    import torch

    params = {**(hf_config.get("rope_scaling") or {}), **rope_parameters(hf_config)}
    # configs written before transformers 5 keep it at the top level
    original_length = params.get("original_max_position_embeddings", hf_config.get("original_max_position_embeddings"))
    common = dict(condense_ratio=1, dtype=torch.float32, device=torch.device("cpu"))
    if rope_type == "llama3":
        from litert_torch.generative.examples.llama import llama

        build = partial(
            llama._build_llama3_rope_cache,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            max_seq_len=int(original_length),
            **common,
        )
        return dict(build_rope=build)
    from litert_torch.generative.examples.phi import phi3

    require(original_length is not None, "LongRoPE needs original_max_position_embeddings.")
    # As transformers computes it: the factor defaults to how far the context was stretched.
    factor = params.get("factor") or max_positions(hf_config) / original_length
    scale = params.get("attention_factor") or (
        math.sqrt(1 + math.log(factor) / math.log(original_length)) if factor > 1 else 1.0
    )
    build = partial(phi3._build_phi3_rope, theta_factors=torch.tensor(params["short_factor"]), scale=scale, **common)
    # transformers switches to long_factor once a position passes original_max_position_embeddings;
    # one export has one RoPE table, so it covers the short range only.
    return dict(build_rope=build, max_seq_len=min(attended_length(hf_config), int(original_length)))


def head_dim(hf_config: dict[str, Any]) -> int:
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def max_positions(hf_config: dict[str, Any]) -> int:
    return hf_config.get("max_position_embeddings", 2048)


def partial_rotary(hf_config: dict[str, Any]) -> float:
    return rope_parameters(hf_config).get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))


def attended_length(hf_config: dict[str, Any]) -> int:
    """Phi-3 (and Qwen with ``use_sliding_window``) attend over the last ``sliding_window`` tokens only,
    which litert-torch's global attention does not model; up to that many tokens the two agree."""
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
    return min(max_positions(hf_config), window) if window else max_positions(hf_config)


def positions(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` fields for the positions of a family with global attention: how many, and their RoPE."""
    return {"max_seq_len": attended_length(hf_config), **_rope_fields(hf_config)}


def layer_types(hf_config: dict[str, Any], sliding_pattern: int) -> list[str]:
    """Configs from transformers < 4.53 imply the local/global pattern: every n-th layer is global."""
    if hf_config.get("layer_types"):
        return hf_config["layer_types"]
    every = hf_config.get("sliding_window_pattern", sliding_pattern)
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(hf_config["num_hidden_layers"])]
