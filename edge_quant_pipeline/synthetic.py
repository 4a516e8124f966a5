"""Random-weight checkpoints of real model shapes, written by ``transformers``, for benchmarks and tests.

Nothing here downloads anything: the configs are the published shapes of a few edge models, the
weights are random (seeded), and the tokenizer is a byte-level BPE trained on the bundled demo
corpus, its vocabulary filled up to the model's size with tokens the text never produces. Such a
checkpoint costs what the real one costs to convert and evaluate; its quality numbers mean nothing.

    python -m edge_quant_pipeline.synthetic qwen2.5-0.5b /tmp/checkpoints
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edge_quant_pipeline.settings import PACKAGE_DIR

TRAIN_TEXT = PACKAGE_DIR / "demo" / "corpus" / "train.txt"
EOS_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The config.json fields that shape each model, as published (architecture sizes only).
# Llama 3.1 and 3.2's RoPE: frequencies scaled for a context 32x the 8,192 tokens they were trained on.
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters=LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama3.2-3b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters=LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # OLMo 2 1B (allenai/OLMo-2-0425-1B): a family no test here covers, through export_hf's generic path
    "olmo2-1b": dict(
        model_type="olmo2",
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "gemma3-270m": dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # Gemma 4 E2B as Google ships it (google/gemma-4-E2B-it's config.json): the multimodal model, its language model
    # with per-layer embeddings (a 262,144 x 35 x 256 table, 2.35B of its 5.1B parameters), KV cache shared by its
    # last 20 blocks, feed-forward twice as wide in those, global layers with 512-wide heads; towers as shipped.
    "gemma4-e2b": dict(
        model_type="gemma4",
        text_config=dict(
            vocab_size=262144,
            vocab_size_per_layer_input=262144,
            hidden_size_per_layer_input=256,
            hidden_size=1536,
            intermediate_size=6144,
            use_double_wide_mlp=True,
            num_hidden_layers=35,
            num_kv_shared_layers=20,
            layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            global_head_dim=512,
            sliding_window=512,
            max_position_embeddings=131072,
            final_logit_softcapping=30.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
        vision_config=dict(use_clipped_linears=True),  # the rest as transformers' defaults, which are E2B's
        audio_config=dict(),
        tie_word_embeddings=True,
    ),
}


def make_tokenizer(vocab_size: int):
    """A byte-level BPE learned on the demo corpus, padded with unused tokens to ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 2000),
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(TRAIN_TEXT)], trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    # Ids the merges never reach: a real vocabulary's size with this corpus's tokenization.
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), vocab_size)})
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS_TOKEN)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_checkpoint(
    shape: dict[str, Any], output: Path, dtype: str = "bfloat16", seed: int = 0, tokenizer: bool = True
) -> Path:
    """``save_pretrained`` of a random model of ``shape`` (config.json fields), its tokenizer beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if tokenizer:
        tokens = make_tokenizer(config.get_text_config().vocab_size)
        config.eos_token_id = config.get_text_config().eos_token_id = tokens.eos_token_id
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(output)
    if tokenizer:
        tokens.save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("checkpoint_dir", type=Path, help="the folder to create the checkpoint folder in")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    print(write_checkpoint(SHAPES[args.shape], args.checkpoint_dir / args.shape, args.dtype))


if __name__ == "__main__":
    main()
