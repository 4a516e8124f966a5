"""A LiteRT-LM bundle (``.litertlm``): what apps load on a phone, packed with ``litert-lm-builder``.

One file holds the ``.tflite`` (and its embedders, ``embedders.py``), the checkpoint's own HF tokenizer, and
the LLM metadata the runtime reads: start and stop tokens, the chat template, the model type and the context
length of the export. It also holds an ``ExecutorMetadata`` section naming every KV cache buffer and the axis
its sequence runs along; without it, LiteRT-LM guesses the context length from dimension 2 of the K cache,
which is a head count in a Generative API export, and its first prefill fails ("Input token ids are too long").

The bundle sits beside the ``.tflite`` it was packed from (``bundle_path``), in the work folder and in a
published version.
"""

from __future__ import annotations

import json
import mmap
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edge_quant_pipeline.atomic import atomic_path
from edge_quant_pipeline.checkpoints.validate import TOKENIZER_FILE, language_config
from edge_quant_pipeline.disk import check_free_disk
from edge_quant_pipeline.embedders import embedders_of
from edge_quant_pipeline.settings import GENERATIVE_API, WORK_DIR_VARIABLE

BUILDER_PACKAGE = "litert-lm-builder"
# The model types LiteRT-LM knows (its llm_model_type.proto), by config.json model_type; the rest is generic.
LLM_MODEL_TYPES = {
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "gemma4": "gemma4",
    "qwen3": "qwen3",
    "qwen2": "qwen2p5",
}
# each LlmModelType field and its message
_MODEL_TYPE_MESSAGES = {
    "generic_model": "GenericModel",
    "gemma3": "Gemma3",
    "gemma4": "Gemma4",
    "qwen3": "Qwen3",
    "qwen2p5": "Qwen2p5",
}
_KV_CACHE = re.compile(r"kv_cache_([kv])_(\d+)")


class BundleError(ValueError):
    """A checkpoint lacks what a bundle needs; the message names the file and the fix."""


@dataclass(frozen=True)
class BundleSpec:
    """What the runtime needs to know of the model, from the checkpoint's own files."""

    tokenizer: Path  # tokenizer.json
    start_token_id: int | None  # prepended by the runtime, where the tokenizer prepends it too
    stop_token_ids: tuple[int, ...]
    chat_template: str | None
    llm_model_type: str
    context_length: int  # the export's KV cache length


def bundle_path(tflite: Path) -> Path:
    return tflite.with_suffix(".litertlm")


def builder_version() -> str:
    return metadata.version(BUILDER_PACKAGE)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_ids(value: Any) -> list[int]:
    return [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]


def _stop_token_ids(generation: dict[str, Any], hf_config: dict[str, Any]) -> tuple[int, ...]:
    """generation_config.json's eos_token_id, else config.json's (the model's own text's or its language model's)."""
    for source in (generation, hf_config, language_config(hf_config)):
        if ids := _token_ids(source.get("eos_token_id")):
            return tuple(ids)
    return ()


def _start_token_id(tokenizer, generation: dict[str, Any], hf_config: dict[str, Any]) -> int | None:
    """The BOS token where tokenizing prepends it: a declared BOS that tokenization never adds would make the
    runtime prepend a token the model never saw there (litert-torch's export_hf checks the same)."""
    declared = generation.get("bos_token_id")
    declared = declared if declared is not None else language_config(hf_config).get("bos_token_id")
    ids = tokenizer.encode("x").ids
    return declared if declared is not None and ids and ids[0] == declared else None


def _chat_template(checkpoint_dir: Path) -> str | None:
    template_file = checkpoint_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    return _read_json(checkpoint_dir / "tokenizer_config.json").get("chat_template") or None


def bundle_spec(checkpoint_dir: Path, hf_config: dict[str, Any], kv_cache_len: int) -> BundleSpec:
    from tokenizers import Tokenizer

    tokenizer_file = checkpoint_dir / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise BundleError(
            f"{tokenizer_file}: missing; a LiteRT-LM bundle carries the model's tokenizer. Save it beside the "
            "weights (tokenizer.save_pretrained)."
        )
    generation = _read_json(checkpoint_dir / "generation_config.json")
    stop_token_ids = _stop_token_ids(generation, hf_config)
    if not stop_token_ids:
        raise BundleError(
            f"{checkpoint_dir / 'generation_config.json'}: no eos_token_id (nor in config.json); LiteRT-LM needs "
            "the tokens that end a reply. Set eos_token_id there to the model's end-of-text token id(s)."
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return BundleSpec(
        tokenizer=tokenizer_file,
        start_token_id=_start_token_id(tokenizer, generation, hf_config),
        stop_token_ids=stop_token_ids,
        chat_template=_chat_template(checkpoint_dir),
        llm_model_type=LLM_MODEL_TYPES.get(hf_config.get("model_type"), "generic_model"),
        context_length=kv_cache_len,
    )


def _llm_metadata(spec: BundleSpec):
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    llm = llm_metadata_pb2.LlmMetadata(max_num_tokens=spec.context_length)
    if spec.start_token_id is not None:
        llm.start_token.token_ids.ids.append(spec.start_token_id)
    for token in spec.stop_token_ids:
        llm.stop_tokens.add().token_ids.ids.append(token)
    if spec.chat_template:
        llm.jinja_prompt_template = spec.chat_template
    message = getattr(llm_model_type_pb2, _MODEL_TYPE_MESSAGES[spec.llm_model_type])
    llm.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(**{spec.llm_model_type: message()}))
    return llm


def kv_cache_names(tflite: Path) -> list[str]:
    """The decode signature's KV cache inputs, read from the flatbuffer in place."""
    from ai_edge_litert import schema_py_generated as schema

    with tflite.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = schema.Model.GetRootAs(data, 0)
        signatures = [model.SignatureDefs(i) for i in range(model.SignatureDefsLength())]
        decode = next(s for s in signatures if s.SignatureKey().decode() == "decode")
        names = [decode.Inputs(i).Name().decode() for i in range(decode.InputsLength())]
    return [name for name in names if _KV_CACHE.fullmatch(name)]


def _executor_metadata(tflite: Path, exporter: str, context_length: int):
    """Every KV cache buffer as a global cache (LiteRT-LM's own export_hf packer does so too where the
    sliding window is no ring buffer), along the axis its exporter puts the sequence on: ``[1, seq, heads,
    dim]`` for both in a Generative API export; K ``[1, heads, seq, dim]`` and V ``[1, heads, dim, seq]``
    from export_hf."""
    from litert_lm_builder.runtime.proto import executor_metadata_pb2 as proto

    axes = {"k": 1, "v": 1} if exporter == GENERATIVE_API else {"k": 2, "v": 3}
    kinds = {"k": proto.StateBuffer.TYPE_GLOBAL_KEY_CACHE, "v": proto.StateBuffer.TYPE_GLOBAL_VALUE_CACHE}
    executor = proto.ExecutorMetadata()
    llm = executor.llm_executor_metadata
    for name in kv_cache_names(tflite):
        kind = _KV_CACHE.fullmatch(name)[1]
        llm.state_buffers.add(
            prefill_input_name=name,
            prefill_output_name=name,
            decode_input_name=name,
            decode_output_name=name,
            policy=proto.StateBuffer.POLICY_DEFAULT,
            type=kinds[kind],
            sequence_axis=axes[kind],
            maximum_sequence_length=context_length,
        )
    llm.max_history_size = context_length
    return executor


def build_bundle(tflite: Path, spec: BundleSpec, exporter: str, output: Path, executor_metadata: bool = True) -> Path:
    """``output``, packed from ``tflite`` and its embedders; ``executor_metadata=False`` packs the bundle LiteRT-LM
    misreads (the tests prove that the runtime check catches it). ``NotEnoughDiskError`` before anything is written
    when ``output``'s disk cannot hold it: about as large as its files (20 GB for Gemma 4 E2B's float model)."""
    import litert_lm_builder as builder_lib

    parts = (tflite, *embedders_of(tflite).values(), spec.tokenizer)
    check_free_disk(output.parent, sum(part.stat().st_size for part in parts), WORK_DIR_VARIABLE)

    builder = builder_lib.LitertLmFileBuilder()
    builder.add_system_metadata(
        builder_lib.Metadata(key="Authors", value="edge-quant-pipeline", dtype=builder_lib.DType.STRING)
    )
    with tempfile.TemporaryDirectory() as scratch:
        sections = {"llm_metadata.pb": _llm_metadata(spec)}
        if executor_metadata:
            sections["executor_metadata.pb"] = _executor_metadata(tflite, exporter, spec.context_length)
        for name, message in sections.items():
            (Path(scratch) / name).write_bytes(message.SerializeToString())
        builder.add_llm_metadata(str(Path(scratch) / "llm_metadata.pb"))
        if executor_metadata:
            builder.add_executor_metadata(str(Path(scratch) / "executor_metadata.pb"))
        builder.add_hf_tokenizer(str(spec.tokenizer))
        builder.add_tflite_model(str(tflite), builder_lib.TfLiteModelType.PREFILL_DECODE)
        roles = {"embedder": builder_lib.TfLiteModelType.EMBEDDER}
        roles["per_layer_embedder"] = builder_lib.TfLiteModelType.PER_LAYER_EMBEDDER
        for role, path in embedders_of(tflite).items():
            builder.add_tflite_model(str(path), roles[role])
        with atomic_path(output) as partial, partial.open("wb") as stream:
            builder.build(stream)
    return output
