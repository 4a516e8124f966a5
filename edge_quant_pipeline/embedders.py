"""Embedding lookups exported as ``.tflite`` files of their own, beside the model that takes their output.

Gemma 4's small models (E2B, E4B) add a per-layer embedding to every block (PLE): a second table, vocabulary x
(blocks x 256), larger than the rest of the model. ``export_hf`` exports them with ``externalize_embedder``:
the model's signatures take ``embeddings`` and ``per_layer_embeddings`` instead of ``tokens``, and each
lookup is a file of its own (``embedder.tflite``, ``per_layer_embedder.tflite``), as LiteRT-LM loads them
(a phone keeps the large tables memory-mapped and reads only the rows of the tokens it sees).

Wherever the pipeline keeps a model (the work folder, a published version), its embedders sit beside it,
named ``<model stem>.<role>.tflite``; this module is the one place that knows the convention.
"""

from __future__ import annotations

from pathlib import Path

# role: the model's input its output feeds
EMBEDDER_INPUTS = {"embedder": "embeddings", "per_layer_embedder": "per_layer_embeddings"}


def embedder_path(tflite: Path, role: str) -> Path:
    return tflite.with_name(f"{tflite.stem}.{role}.tflite")


def embedders_of(tflite: Path) -> dict[str, Path]:
    """The embedder files beside ``tflite``, by role (none for a model that takes tokens)."""
    found = {role: embedder_path(tflite, role) for role in EMBEDDER_INPUTS}
    return {role: path for role, path in found.items() if path.exists()}


def signature_for(role: str, num_tokens: int) -> str:
    """The embedder's signature for a call of ``num_tokens`` (decode's, or the prefill's of that length), as
    ``export_hf`` names them."""
    return f"decode_{role}" if num_tokens == 1 else f"prefill_{role}_{num_tokens}"
