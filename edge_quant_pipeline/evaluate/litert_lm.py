"""A LiteRT-LM bundle in the LiteRT-LM runtime itself, on the CPU, as an app runs it: in a fresh process.

The process loads the bundle once (``Engine``) and, in a session per prompt, prefills the prompt given as text
(the runtime tokenizes it with the bundle's tokenizer and prepends its start token) and decodes greedily; it
prints what came out and the runtime's own benchmark (init time; time to first token, prefill and decode
tokens per second, the median over the prompts) with its peak RSS. A fresh process keeps the runtime's native
logs and its memory out of the step, and a crash of the runtime a message:

    python -m edge_quant_pipeline.evaluate.litert_lm model.litertlm --prompts-file prompts.json --tokens 16

The runtime reports success for a bundle it misreads (``litert-lm run`` exits 0, and its benchmark is all
zeros), so the check is on what it generated, not on whether it raised.

A bundle with a chat template then holds a two-turn conversation through the runtime's Conversation API, the API
apps use, which renders the template itself: a template the runtime cannot render, or a conversation that replies
nothing, fails the check with the runtime's message (google-ai-edge/LiteRT-LM#2078, #3021 are bundles whose raw
sessions work and whose template does not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.evaluate.bundle import BundleSpec
from edge_quant_pipeline.evaluate.health import GenerationHealth, generation_health
from edge_quant_pipeline.memory import peak_rss_mb


@dataclass(frozen=True)
class RuntimeRun:
    """What LiteRT-LM generated from each prompt, and its own measurements of the run."""

    texts: list[str]  # what it generated from each prompt, detokenized by the runtime
    prompt_tokens: int  # of the first prompt, as the runtime counted them (its start token included)
    init_s: float
    time_to_first_token_ms: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_mb: float
    decoded_tokens: list[int]  # per prompt, as the runtime counted them: fewer than asked when a stop token came
    chat_replies: list[str]  # the Conversation API's reply to each of CHAT_TURNS; empty without a chat template


# Long generations, to see collapse (health.py): as many tokens as the KV cache leaves after the prompt, at most.
HEALTH_TOKENS = 256
# Short, since a bundle's KV cache may be small (the demo's 128 tokens are 128 bytes).
CHAT_TURNS = ("Hi", "Go on")
CHAT_REPLY_TOKENS = 8
_CHAT_FAILED = 3  # the child's exit status when the conversation failed


class BundleRejectedError(RuntimeError):
    """LiteRT-LM could not load or run the bundle, or generated nothing from it."""


@dataclass(frozen=True)
class RuntimeCheck:
    """The bundle in LiteRT-LM against the interpreter on the same ``.tflite``. Agreements are the share of the
    interpreter's greedy continuation (and the float model's) from the same prompt, as text, that the runtime's
    text repeats from its start (``_agreement``); a runtime that stopped early (a stop token) agrees on less.
    Measured so since evaluation-7; before, as tokens equal position by position: the two are not comparable."""

    run: RuntimeRun
    interpreter_agreement: float
    float_agreement: float
    health: GenerationHealth  # of the generations, each as long as the KV cache allows (health.py)

    def as_dict(self) -> dict[str, float | int]:
        """Flat and named for LiteRT-LM, for the evaluation's table (the generated texts and counts stay out)."""
        lists = ("texts", "decoded_tokens", "chat_replies")
        measured = {name: value for name, value in asdict(self.run).items() if name not in lists}
        agreements = {"interpreter_agreement": self.interpreter_agreement, "float_agreement": self.float_agreement}
        return {f"litert_lm_{name}": value for name, value in {**agreements, **measured, **asdict(self.health)}.items()}


def _agreement(generated: str, reference: str) -> float:
    """The share of ``reference`` (greedy tokens decoded) that the runtime's text repeats from its start, in
    characters. Text, because the runtime gives text, and token ids that do not survive decoding (a byte of a
    character, a lone byte decoded as U+FFFD) are tokenized back differently; both are cut at a NUL, where the
    runtime's text ends (it hands back a C string)."""
    generated, reference = generated.split("\0")[0], reference.split("\0")[0]
    if not reference:  # nothing to repeat: agreeing is saying nothing either
        return float(not generated)
    return len(os.path.commonprefix([generated, reference])) / len(reference)


class _Texts:
    """Token ids as the text LiteRT-LM is given and gives back, with the bundle's tokenizer."""

    def __init__(self, spec: BundleSpec):
        from tokenizers import Tokenizer

        self.tokenizer, self.start = Tokenizer.from_file(str(spec.tokenizer)), spec.start_token_id

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def prompt(self, ids: np.ndarray) -> str:
        """A prompt as text, without the start token the runtime prepends itself."""
        return self.text(ids[1:] if self.start is not None and ids[0] == self.start else ids)


def _generate(
    bundle: Path, spec: BundleSpec, texts: _Texts, prompts: np.ndarray, chat: bool
) -> tuple[RuntimeRun, GenerationHealth]:
    """Greedy generations from ``prompts`` as long as the KV cache allows after a prompt and its start token, and
    their health."""
    budget = min(HEALTH_TOKENS, spec.context_length - prompts.shape[1] - 1)
    run = run_bundle(bundle, [texts.prompt(p) for p in prompts], budget, chat=chat)
    return run, generation_health([texts.tokens(t) for t in run.texts], run.decoded_tokens, budget)


def check_bundle(
    bundle: Path, spec: BundleSpec, prompts: np.ndarray, interpreter: np.ndarray, float_model: np.ndarray
) -> RuntimeCheck:
    """Generate in LiteRT-LM after ``prompts`` (token ids, given as text) as many tokens as the KV cache allows,
    compare their start with ``interpreter`` and ``float_model`` (the greedy tokens from each prompt), and score
    their health. The runtime prepends its start token to every prompt, so with one, only prompts that begin
    with it are like for like (given without it): the first window of the eval text at least, as the tokenizer
    adds it there; agreements are on those."""
    texts = _Texts(spec)
    chosen = [i for i, prompt in enumerate(prompts) if texts.start is None or prompt[0] == texts.start]
    run, health = _generate(bundle, spec, texts, prompts, chat=spec.chat_template is not None)

    def agreement(expected: np.ndarray) -> float:
        return float(np.mean([_agreement(run.texts[i], texts.text(expected[i])) for i in chosen]))

    return RuntimeCheck(run, agreement(interpreter), agreement(float_model), health)


def float_generations(bundle: Path, spec: BundleSpec, prompts: np.ndarray) -> tuple[RuntimeRun, GenerationHealth]:
    """The float bundle's generations from ``prompts`` (with the runtime's own measurements, its peak memory among
    them) and their health, as ``check_bundle`` scores a recipe's."""
    return _generate(bundle, spec, _Texts(spec), prompts, chat=False)


def failure_reason(done: subprocess.CompletedProcess) -> str:
    """Why a fresh process running LiteRT-LM failed: the runtime's first error line (glog's "E0000 ...
    file.cc:123] message"; the later ones are its teardown complaining), else Python's last word."""
    lines = done.stderr.strip().splitlines()
    errors = [line.split("] ", 1)[-1] for line in lines if line.startswith("E0000")]
    return errors[0] if errors else lines[-1] if lines else f"exit code {done.returncode}"


def run_bundle(bundle: Path, prompts: list[str], num_tokens: int, chat: bool = False) -> RuntimeRun:
    """Generate ``num_tokens`` greedily after each of ``prompts`` in a fresh process, then with ``chat`` hold
    the conversation of CHAT_TURNS with the bundle's chat template. The XNNPACK cache the runtime would write
    next to the bundle (packed weights, as large as the model) goes to a scratch folder beside it, removed when
    the run ends."""
    with tempfile.TemporaryDirectory(dir=bundle.parent, prefix=f".{bundle.name}.run-") as scratch:
        prompts_file = Path(scratch) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))
        command = [sys.executable, "-m", __name__, str(bundle), "--prompts-file", str(prompts_file)]
        command += ["--tokens", str(num_tokens), "--cache-dir", scratch] + (["--chat"] if chat else [])
        done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if done.returncode == _CHAT_FAILED:
        raise BundleRejectedError(
            f"LiteRT-LM's Conversation API failed with the chat template of {bundle}: {failure_reason(done)}"
        )
    if done.returncode != 0:
        raise BundleRejectedError(f"LiteRT-LM could not run {bundle}: {failure_reason(done)}")
    run = RuntimeRun(**json.loads(done.stdout.strip().splitlines()[-1]))
    if not any(run.texts):  # one prompt may end where the model stops at once: that is an early stop (health.py)
        raise BundleRejectedError(f"LiteRT-LM generated no tokens from {bundle} (it loaded, and said nothing wrong).")
    if chat and not all(run.chat_replies):
        raise BundleRejectedError(
            f"LiteRT-LM's Conversation API replied nothing with the chat template of {bundle} (replies: "
            f"{run.chat_replies}), though raw sessions generate."
        )
    return run


def _converse(engine) -> list[str]:
    """The replies to CHAT_TURNS in one conversation, greedy, as an app's chat would get them."""
    import litert_lm

    with engine.create_conversation(
        sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=CHAT_REPLY_TOKENS
    ) as conversation:
        replies = [conversation.send_message(turn) for turn in CHAT_TURNS]
    return ["".join(getattr(part, "text", "") for part in reply.contents) for reply in replies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompts-file", type=Path, required=True, help="a JSON list of prompts")
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--chat", action="store_true", help="then converse with the bundle's chat template")
    args = parser.parse_args()
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    texts, benchmarks = [], []
    with litert_lm.Engine(
        str(args.bundle), backend=litert_lm.Backend.CPU(), enable_benchmark=True, cache_dir=str(args.cache_dir)
    ) as engine:
        for prompt in json.loads(args.prompts_file.read_text()):
            session = engine.create_session(
                apply_prompt_template=False,
                sampler_config=litert_lm.SamplerConfig(top_k=1),
                max_output_tokens=args.tokens,
            )
            session.run_prefill([prompt])
            texts.append("".join(session.run_decode().texts))
            benchmarks.append(session.get_benchmark_info())
            session.close()
        try:
            chat_replies = _converse(engine) if args.chat else []
        except RuntimeError:  # the runtime said why on stderr (failure_reason reads it)
            sys.exit(_CHAT_FAILED)
    run = RuntimeRun(
        texts=texts,
        prompt_tokens=benchmarks[0].last_prefill_token_count,
        init_s=benchmarks[0].init_time_in_second,
        time_to_first_token_ms=1e3 * float(np.median([b.time_to_first_token_in_second for b in benchmarks])),
        prefill_tokens_per_s=float(np.median([b.last_prefill_tokens_per_second for b in benchmarks])),
        decode_tokens_per_s=float(np.median([b.last_decode_tokens_per_second for b in benchmarks])),
        peak_rss_mb=peak_rss_mb(),
        decoded_tokens=[b.last_decode_token_count for b in benchmarks],
        chat_replies=chat_replies,
    )
    print(json.dumps(asdict(run)))


if __name__ == "__main__":
    main()
