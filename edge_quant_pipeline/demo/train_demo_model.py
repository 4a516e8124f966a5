"""Train the bundled demo checkpoint: a tiny byte-level Llama.

The demo model is trained here, from the text in ``corpus/train.txt`` (written
for this project), so that everything the pipeline ships is ours to ship. It is
a real ``transformers`` ``LlamaForCausalLM`` saved with ``save_pretrained``, so
it has exactly the layout users bring (``config.json`` + ``model.safetensors``,
Hugging Face tensor names).

Run it again with ``python -m edge_quant_pipeline.demo.train_demo_model``; on 2
CPU cores it takes about a minute and prints the held-out perplexity.

Its tokenizer is the bytes themselves (token id = byte value), written beside the
weights as a ``tokenizer.json`` (``byte_tokenizer``) so that a LiteRT-LM bundle of
the demo carries it, as a real checkpoint's carries its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEMO_DIR = Path(__file__).parent
CORPUS_DIR = DEMO_DIR / "corpus"
DEFAULT_OUTPUT = DEMO_DIR / "checkpoints" / "tiny-llama-bytes"

# Dimensions are multiples of 128 so that every int4 block size up to 128
# divides the quantized weights; two KV heads make it grouped-query attention
# like the Llama 3 / SmolLM family the demo stands in for.
DEMO_CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def byte_tokens(path: Path) -> torch.Tensor:
    return torch.tensor(list(path.read_bytes()), dtype=torch.long)


NEWLINE = ord("\n")


def byte_tokenizer():
    """Byte-level BPE without merges, each byte its own token with the byte's value as id: what ``byte_tokens``
    computes, in the form runtimes load. ByteLevel maps each byte to one printable character, by GPT-2's table."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={characters[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def random_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, tokens: torch.Tensor, seq_len: int) -> float:
    model.eval()
    windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
    loss = model(input_ids=windows, labels=windows).loss
    model.train()
    return math.exp(loss.item())


def train(output_dir: Path, steps: int, seq_len: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_tokens = byte_tokens(CORPUS_DIR / "train.txt")
    eval_tokens = byte_tokens(CORPUS_DIR / "eval.txt")

    model = LlamaForCausalLM(DEMO_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = random_batches(train_tokens, seq_len, batch_size, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step:4d}/{steps}  train loss {loss.item():.3f}  ({time.perf_counter() - started:.0f}s)")

    stats = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": steps,
        "train_seconds": round(time.perf_counter() - started, 1),
        "held_out_perplexity": round(perplexity(model, eval_tokens, seq_len), 3),
        "uniform_perplexity": DEMO_CONFIG.vocab_size,
        "train_text_sha256": hashlib.sha256((CORPUS_DIR / "train.txt").read_bytes()).hexdigest(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    # The bytes have no end-of-text token; a newline ends a reply (LiteRT-LM needs a stop token to run at all).
    model.generation_config.eos_token_id = NEWLINE
    model.save_pretrained(output_dir)
    byte_tokenizer().save(str(output_dir / "tokenizer.json"))
    (output_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stats = train(args.output, args.steps, args.seq_len, args.batch_size, args.seed)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
