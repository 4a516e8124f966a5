"""Which of litert-torch's two exporters turns a checkpoint into a float ``.tflite``.

- ``generative_api``: litert-torch rebuilds the model from its own layers (``architectures.py``) and
  ``converter.convert_to_tflite`` exports it. Its prefill returns logits for every position, so evaluation
  scores a chunk per call.
- ``export_hf``: ``litert_torch.generative.export_hf`` exports transformers' own modeling code, patched
  where the runtime needs it. It covers the families the rebuild does not, and configs the rebuild refuses
  (a RoPE scaling its layers lack). Its signatures take a ``mask`` input and its prefill returns no logits.

``auto`` (the default) takes the rebuild where it accepts the config and ``export_hf`` otherwise. A family that
neither the rebuild nor the ``export_hf`` families proven by ``tests/test_export_hf.py`` cover goes through
``export_hf``'s generic path, and each of its exports is proven against transformers' own model before any recipe
uses it (``evaluate/export_proof.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_quant_pipeline.checkpoints.validate import language_config
from edge_quant_pipeline.export.architectures import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    architecture_for,
)
from edge_quant_pipeline.processes import last_word
from edge_quant_pipeline.settings import AUTO, EXPORT_HF, GENERATIVE_API, checked_exporter
from edge_quant_pipeline.shapes import ModelShape

# Proven through export_hf here: a tiny random model of each, written by transformers, exported, run in the
# interpreter against transformers' own logits, and quantized with a whole-model and a selective recipe.
EXPORT_HF_MODEL_TYPES = ("llama", "qwen3", "gemma3_text", "smollm3", "ministral3", "gemma4", "gemma4_text")


@dataclass(frozen=True)
class ExportPlan:
    exporter: str
    shape: ModelShape
    proven_family: bool = True  # False: export_hf's generic path, proven per checkpoint (evaluate/export_proof.py)


# Above this many bytes of weights, a checkpoint's plan is made in a child process (``plan_export_apart``).
PLAN_APART_BYTES = 2 << 30
_REFUSED = 3  # the planning child's exit status when the checkpoint is refused (its reason on stdout)


# What either exporter needs of config.json; a config without one is broken whichever exporter takes it.
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _transformers_default(hf_config: dict[str, Any], field: str) -> Any:
    """A field config.json leaves out, as transformers fills it in for this model type (export_hf runs its model)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(hf_config["model_type"]), field)


def export_hf_shape(hf_config: dict[str, Any]) -> ModelShape:
    """The model's shape as recipe validation needs it, from config.json (transformers' own layer sizes)."""
    text = language_config(hf_config)
    hidden, heads = text["hidden_size"], text["num_attention_heads"]
    head_dims = {text.get("head_dim") or hidden // heads, text.get("global_head_dim") or hidden // heads}
    tied = bool(hf_config.get("tie_word_embeddings", _transformers_default(hf_config, "tie_word_embeddings")))
    # the per-layer table's rows hold every block's slice (blocks x hidden_size_per_layer_input)
    per_layer = (
        text["num_hidden_layers"] * text["hidden_size_per_layer_input"] if per_layer_embeddings(hf_config) else 0
    )
    embedding = (hidden, per_layer) if per_layer else (hidden,)
    return ModelShape(
        num_layers=text["num_hidden_layers"],
        tied_lm_head=tied,
        reduction_dims={
            "embedding": embedding,
            "attention": (hidden, *sorted(heads * d for d in head_dims)),
            "feedforward": (hidden, text["intermediate_size"]),
            "lm_head": (hidden,),
        },
    )


def per_layer_embeddings(hf_config: dict[str, Any]) -> bool:
    """Gemma 4's per-layer embeddings (E2B, E4B), which ``export_hf`` exports only as an embedder of their own."""
    return bool(language_config(hf_config).get("hidden_size_per_layer_input"))


def plan_export(hf_config: dict[str, Any], config_path: Path, exporter: str = AUTO) -> ExportPlan:
    """The exporter for this checkpoint (``exporter`` pins one), or ``UnsupportedArchitectureError`` saying why
    neither takes it."""
    checked_exporter(exporter)
    model_type = hf_config.get("model_type")
    missing = [name for name in _REQUIRED_FIELDS if name not in language_config(hf_config)]
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
    generic_path_refusal = None if model_type in EXPORT_HF_MODEL_TYPES else _not_a_causal_lm(hf_config)
    if generic_path_refusal:
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported: {generic_path_refusal}. The Generative API "
            f"rebuild takes: {', '.join(SUPPORTED_MODEL_TYPES)}; export_hf, proven here: "
            f"{', '.join(EXPORT_HF_MODEL_TYPES)}; export_hf's generic path takes other decoder-only text-generation "
            "checkpoints, each export proven against transformers (docs/checkpoints.md)."
        )
    _refuse_what_export_hf_cannot_export(hf_config, config_path)
    return ExportPlan(EXPORT_HF, export_hf_shape(hf_config), proven_family=model_type in EXPORT_HF_MODEL_TYPES)


def _not_a_causal_lm(hf_config: dict[str, Any]) -> str | None:
    """Why export_hf's generic path cannot take the checkpoint as a decoder-only text-generation model, or None:
    transformers must have a causal LM class for its model_type, and config.json (which save_pretrained writes
    the model's class into) must name that class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.get("model_type"))
    architectures = hf_config.get("architectures") or []
    if causal_lm is None or hf_config.get("is_encoder_decoder"):
        return "transformers has no decoder-only text-generation class for it"
    if causal_lm not in architectures:
        named = ", ".join(architectures) or "none"
        return f"config.json's architectures ({named}) do not name transformers' {causal_lm}"
    return None


def _refuse_what_export_hf_cannot_export(hf_config: dict[str, Any], config_path: Path) -> None:
    text = language_config(hf_config)
    if hf_config["model_type"] == "gemma4_text" and per_layer_embeddings(hf_config):
        raise UnsupportedArchitectureError(
            f"{config_path}: a text-only Gemma 4 checkpoint (Gemma4ForCausalLM) with per-layer embeddings "
            "(hidden_size_per_layer_input) cannot be exported: litert-torch's export_hf takes them only from a "
            "Gemma4ForConditionalGeneration checkpoint (model_type 'gemma4'), as Google publishes Gemma 4 E2B "
            "and E4B. Use that checkpoint."
        )
    if text.get("enable_moe_block"):
        raise UnsupportedArchitectureError(
            f"{config_path}: this Gemma 4 model has mixture-of-experts blocks (enable_moe_block), which are not "
            "supported here; the dense Gemma 4 models (E2B, E4B, 31B) are."
        )


def plan_export_apart(hf_config: dict[str, Any], config_path: Path, exporter: str = AUTO) -> ExportPlan:
    """``plan_export`` in a child process. What it imports to answer (litert-torch's layers, TensorFlow, transformers:
    1.2 GB resident, 7 s) then stays out of this process, which for a large checkpoint exports it next, beside a
    float32 copy of the model (at 4B parameters, the 1.2 GB were what took the process tree past 20 GB)."""
    checked_exporter(exporter)
    command = [sys.executable, "-m", __name__, str(config_path), exporter]
    done = subprocess.run(command, input=json.dumps(hf_config), capture_output=True, text=True, errors="replace")
    answer = done.stdout.strip().splitlines()[-1:]  # its last line: the libraries it imports may print too
    if done.returncode == _REFUSED:
        raise UnsupportedArchitectureError(answer[0])
    if done.returncode != 0:
        raise RuntimeError(f"planning the export of {config_path} failed: {last_word(done.stderr, done.returncode)}")
    plan = json.loads(answer[0])
    dims = {component: tuple(sizes) for component, sizes in plan["shape"]["reduction_dims"].items()}
    return ExportPlan(plan["exporter"], ModelShape(**{**plan["shape"], "reduction_dims": dims}), plan["proven_family"])


def main() -> None:
    """The child of ``plan_export_apart``: config.json's content on stdin, the plan (or the refusal) on stdout."""
    config_path, exporter = Path(sys.argv[1]), sys.argv[2]
    try:
        plan = plan_export(json.loads(sys.stdin.read()), config_path, exporter)
    except UnsupportedArchitectureError as refusal:
        print(refusal)
        sys.exit(_REFUSED)
    print(json.dumps(asdict(plan)))


if __name__ == "__main__":
    main()
