"""The model card of a published version: ``README.md`` beside ``manifest.json``, in the Hugging Face model-card
format (YAML metadata, then markdown), so that a version folder can be uploaded to a model hub as it is. It is
written from the manifest alone, with the version's files, and its sha256 goes into the manifest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from edge_quant_pipeline.quantize.schemes import SchemeError, parse_quantization

CARD_FILE = "README.md"
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the hub spells a repository


def checkpoint_card_facts(checkpoint_dir: Path, hf_config: dict[str, Any]) -> dict[str, str]:
    """What the card copies from the checkpoint: the license its own card declares, and the hub repository it came
    from when ``config.json`` names one (``_name_or_path``); nothing that it does not say."""
    facts = {}
    card = checkpoint_dir / CARD_FILE
    match = _FRONT_MATTER.match(card.read_text(errors="replace")) if card.is_file() else None
    try:
        metadata = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        metadata = None
    if isinstance(metadata, dict) and isinstance(metadata.get("license"), str):
        facts["license"] = metadata["license"]
    source = hf_config.get("_name_or_path")
    if isinstance(source, str) and _HUB_ID.match(source) and not (checkpoint_dir.parent / source).exists():
        facts["base_model"] = source  # org/name, and not a folder beside the checkpoint's (a local save)
    return facts


def _scheme_words(scheme: str) -> str:
    try:
        return f"{parse_quantization(scheme).words} (`{scheme}`)"
    except SchemeError:
        return f"`{scheme}`"


def _field_words(value: Any) -> str:
    """A recipe field in words: a scheme (with its algorithm), or per block, blocks of one scheme together."""
    if not isinstance(value, dict):
        return _scheme_words(value)
    blocks: dict[str, list[str]] = {}
    for block, scheme in value.items():
        blocks.setdefault(scheme, []).append(str(block))
    return "; ".join(f"block{'s' * (len(b) > 1)} {', '.join(b)}: {_scheme_words(s)}" for s, b in blocks.items())


def _recipe_lines(manifest: dict[str, Any]) -> list[str]:
    spec = {k: v for k, v in manifest.get("resolved_spec", {}).items() if v is not None and k != "search"}
    if not spec:
        return ["No weight is quantized: this is the float32 model, the baseline the others are measured against."]
    lines = [f"- **{component}**: {_field_words(value)}" for component, value in spec.items()]
    return [*lines, "", "Components not listed are left as the default says; with no default, in float32."]


def _plus_minus(metrics: dict[str, Any], name: str, fmt: str) -> str:
    value, error = metrics.get(name), metrics.get(f"{name}_error")
    if value is None:
        return ""
    return f"{value:{fmt}} ± {error:{fmt}}" if error is not None else f"{value:{fmt}}"


def _beside_float(metrics: dict[str, Any], health: str) -> str:
    value, reference = metrics.get(f"litert_lm_{health}"), metrics.get(f"float_{health}")
    if value is None:
        return ""
    return f"{value:.3f}" + (f" (float model: {reference:.3f})" if reference is not None else "")


def _quality_lines(metrics: dict[str, Any]) -> list[str]:
    rows = [
        ("perplexity / float", _plus_minus(metrics, "perplexity_ratio", ".4f")),
        ("mean KL divergence from float", _plus_minus(metrics, "mean_kl", ".5f")),
        ("p99 KL", _plus_minus(metrics, "p99_kl", ".4f")),
        ("same top-1 token as float", _plus_minus(metrics, "top1_agreement", ".3f")),
        ("greedy tokens equal to float's", _plus_minus(metrics, "generation_agreement", ".3f")),
        ("repeated 4-grams in long generations, LiteRT-LM", _beside_float(metrics, "repeated_ngram_share")),
        ("distinct tokens in long generations, LiteRT-LM", _beside_float(metrics, "distinct_token_ratio")),
    ]
    return ["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows if value)]


def _task_lines(metrics: dict[str, Any]) -> list[str]:
    tasks = [k for k in metrics if k.startswith("task_") and not k.endswith("_error")]
    if not tasks:
        return []
    lines = ["| task | this model | float model | change (points) |", "|---|---|---|---:|"]
    for key in tasks:
        reference = metrics.get(f"float_{key}")
        change = f"{100 * (metrics[key] - reference):+.1f}" if reference is not None else ""
        lines.append(
            f"| {key.removeprefix('task_')} | {_plus_minus(metrics, key, '.3f')} | "
            f"{_plus_minus(metrics, f'float_{key}', '.3f')} | {change} |"
        )
    return [
        "",
        "Task accuracy, answered by this bundle in LiteRT-LM (lm-evaluation-harness, ± standard error):",
        "",
    ] + lines


def _runtime_lines(metrics: dict[str, Any]) -> list[str]:
    if not metrics.get("litert_lm_decode_tokens_per_s"):
        return []
    return [
        "| time to first token | prefill | decode | peak memory |",
        "|---:|---:|---:|---:|",
        f"| {metrics['litert_lm_time_to_first_token_ms']:.1f} ms | "
        f"{metrics['litert_lm_prefill_tokens_per_s']:.0f} tokens/s | "
        f"{metrics['litert_lm_decode_tokens_per_s']:.0f} tokens/s | {metrics['litert_lm_peak_rss_mb']:.0f} MB |",
    ]


def model_card(manifest: dict[str, Any]) -> str:
    """The card of the version ``manifest`` describes (before its own sha256 is added to it)."""
    metrics, model, recipe = manifest["metrics"], manifest["model"], manifest["recipe"]
    quantized = any(v is not None for v in manifest.get("resolved_spec", {}).values())
    base = manifest.get("base_model")
    metadata = {
        **({"base_model": base} if base else {}),
        "library_name": "litert-lm",
        **({"license": manifest["license"]} if "license" in manifest else {}),
        "pipeline_tag": "text-generation",
        "tags": ["litert", "litert-lm", "tflite", "on-device", *(["quantized"] if quantized else []), recipe],
    }
    export = manifest.get("export", {})
    source = f"[{base}](https://huggingface.co/{base})" if base else f"The checkpoint `{model}`"
    made = f"quantized with the recipe `{recipe}`" if quantized else "kept in float32 (the recipe `float`)"
    smaller = f", {metrics['file_ratio']:.2f}x smaller than float32" if quantized and "file_ratio" in metrics else ""
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {model}, {recipe} (LiteRT-LM)",
        "",
        f"{source}, {made} and converted for on-device inference: `model.litertlm`, "
        "a LiteRT-LM bundle (the model, its tokenizer and metadata) that LiteRT-LM runs on Android, iOS, desktop "
        "and the web, and `model.tflite`, the same model for the LiteRT interpreter (signatures "
        f"`prefill_{export.get('prefill_len', '')}` and `decode`, KV cache of {export.get('kv_cache_len', '')} "
        f"tokens). {metrics['file_bytes'] / 1e6:,.1f} MB{smaller}.",
        "",
        "## Recipe",
        "",
        *_recipe_lines(manifest),
        "",
        "## Quality",
        "",
        f"Against the float model on {metrics.get('eval_tokens', 0):,} held-out tokens (teacher-forced, LiteRT "
        "interpreter; ± one standard error):",
        "",
        *_quality_lines(metrics),
        *_task_lines(metrics),
        "",
        "## Speed and memory in LiteRT-LM",
        "",
        "Measured on the CPU of the machine that published it (median over the evaluation's prompts):",
        "",
        *(_runtime_lines(metrics) or ["Not measured."]),
        "",
        "## Run it",
        "",
        "```bash",
        "pip install litert-lm",
        'litert-lm run model.litertlm --prompt "Hello"',
        "```",
        "",
        "## Provenance",
        "",
        f"Version `{manifest['version']}` (number {manifest.get('number', 0)}) of {model} / {recipe}, published by "
        "edge-quant-pipeline; `manifest.json` beside this card holds the checkpoint's sha256, the recipe, the "
        "toolchain versions and every metric.",
        "",
    ]
    return "\n".join(lines)
