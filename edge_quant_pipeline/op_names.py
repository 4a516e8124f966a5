"""How litert-torch 0.10 names the ops of a converted model, per component.

Op output names carry the module path, e.g.
``...TransformerBlock_3/litert_torch.generative.layers.attention.CausalSelfAttention_atten_func/...``.
Both the recipe rules given to ai-edge-quantizer and the reading-back of a
``.tflite`` (``weights.py``) rely on these patterns, so they live in one place.
Families with their own model class name their blocks after it (Gemma 2, Gemma 3).
"""

BLOCK_CLASSES = r"(?:TransformerBlock|Gemma2Block|DecoderBlock)"
ATTENTION = r"litert_torch\.generative\.layers\.attention\.CausalSelfAttention"
FEEDFORWARD = r"litert_torch\.generative\.layers\.feed_forward\."
EMBEDDING = "Embedding_tok_embedding"
# The LM head's output is the signature's `logits`, unless a softcap follows it (Gemma 2).
LM_HEAD = r"logits_output|Linear_lm_head"


def block_scope(layer: str, block: str = r"\d+") -> str:
    """Regex for the ops of one block's attention or feed-forward (``layer``: ATTENTION or FEEDFORWARD)."""
    return rf"{BLOCK_CLASSES}_{block}/{layer}"
