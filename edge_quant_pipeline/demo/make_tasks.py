"""Write the demo's two tasks from its held-out text (``corpus/eval.txt``, which the demo model never trained on),
in lm-evaluation-harness's JSONL form, sized for what a 0.8M-parameter byte-level model can know, its spelling:

- ``tasks/cloze.jsonl``: the last word of each sentence among itself and three shuffles of its letters (a multiple
  choice, scored by log-likelihood);
- ``tasks/completion.jsonl``: the same word's second half, generated after its first half (exact match).

    python -m edge_quant_pipeline.demo.make_tasks

Deterministic: the same text gives the same files. Each context is at most ``MAX_CONTEXT`` characters (the
demo's tokens are bytes and its KV cache 128), cut at a word from the left.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

DEMO_DIR = Path(__file__).parent
EVAL_TEXT = DEMO_DIR / "corpus" / "eval.txt"
TASK_DIR = DEMO_DIR / "tasks"
MAX_CONTEXT = 96
CHOICES = 4


def sentences(text: str) -> list[tuple[str, str]]:
    """(context, last word) of every sentence whose last word is alphabetic and at least three letters long."""
    pairs = []
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        words = sentence.rstrip(".!?").split()
        if len(words) < 4 or not re.fullmatch(r"[a-z]{3,}", words[-1]):
            continue
        context = " ".join(words[:-1])
        while len(context) > MAX_CONTEXT:
            context = context.split(" ", 1)[1]
        pairs.append((context, words[-1]))
    return pairs


def shuffles(word: str, rng: random.Random, count: int) -> list[str]:
    """``count`` distinct orderings of ``word``'s letters, none of them the word itself."""
    found: set[str] = set()
    while len(found) < count:
        letters = list(word)
        rng.shuffle(letters)
        if "".join(letters) != word:
            found.add("".join(letters))
    return sorted(found)


def main() -> None:
    rng = random.Random(0)
    cloze, completion = [], []
    for context, answer in sentences(EVAL_TEXT.read_text()):
        if len(set(answer)) < 3:  # too few letters to shuffle into three other words
            continue
        choices = [answer, *shuffles(answer, rng, CHOICES - 1)]
        rng.shuffle(choices)
        cloze.append({"context": context, "choices": choices, "answer": choices.index(answer)})
        half = (len(answer) + 1) // 2
        completion.append({"prompt": f"{context} {answer[:half]}", "answer": answer[half:]})
    TASK_DIR.mkdir(exist_ok=True)
    for name, rows in (("cloze", cloze), ("completion", completion)):
        (TASK_DIR / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(cloze)} sentences of {EVAL_TEXT}: {TASK_DIR}/cloze.jsonl, {TASK_DIR}/completion.jsonl")


if __name__ == "__main__":
    main()
