"""How litert-torch 0.10 names the ops of a converted model, per component, for both of its exporters.

Op output names carry the module path. The Generative API rebuild writes
``...TransformerBlock_3/litert_torch.generative.layers.attention.CausalSelfAttention_atten_func/...``
(families with their own model class name their blocks after it: Gemma 2, Gemma 3); ``export_hf``, which
runs transformers' own modules, writes
``...Qwen3DecoderLayer_3/transformers.models.qwen3.modeling_qwen3.Qwen3Attention_self_attn/...``.
Both the recipe rules given to ai-edge-quantizer and the reading-back of a ``.tflite`` (``weights.py``) rely
on these patterns, so they live in one place. ``export_hf`` merges the names of neighbouring ops (a k
projection's name can also name the q projection), but never across a block or between attention and
feed-forward, which is all these patterns tell apart.
"""

BLOCK_CLASSES = r"(?:TransformerBlock|Gemma2Block|DecoderBlock|DecoderLayer)"
ATTENTION = r"(?:litert_torch\.generative\.layers\.attention\.CausalSelfAttention|[\w.]*Attention_self_attn)"
FEEDFORWARD = r"(?:litert_torch\.generative\.layers\.feed_forward\.|[\w.]*MLP_mlp)"
EMBEDDING = r"Embedding_(?:tok_embedding|embed_tokens)"
# The LM head's output is the signature's `logits`, unless a softcap follows it (Gemma 2).
LM_HEAD = r"logits_output|Linear_lm_head"


def block_scope(layer: str, block: str = r"\d+") -> str:
    """Regex for the ops of one block's attention or feed-forward (``layer``: ATTENTION or FEEDFORWARD)."""
    return rf"{BLOCK_CLASSES}_{block}/{layer}"
