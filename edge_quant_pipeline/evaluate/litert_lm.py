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

lm-eval's tasks (``tasks.py``) are answered after that in a fresh process of their own, which loads the bundle
again: forked from a server that imported lm-eval and LiteRT-LM once per process that asks (``fork_server.py``;
1.2 s of imports that the tasks of the demo's bundles took each), so the check's process holds no more than an app
does when the runtime measures it, and a task that fails (or crashes the runtime) costs the tasks only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_quant_pipeline.evaluate.bundle import BundleSpec
from edge_quant_pipeline.evaluate.health import GenerationHealth, generation_health
from edge_quant_pipeline.evaluate.tasks import PROGRESS, TaskRequest, TaskScore, score_tasks
from edge_quant_pipeline.fork_server import ForkServer, ForkServerError, fork_server
from edge_quant_pipeline.memory import peak_rss_mb
from edge_quant_pipeline.processes import die_with_parent, last_word

log = logging.getLogger(__name__)


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
    tasks: tuple[TaskScore, ...] = ()  # lm-eval's tasks answered by the same engine (tasks.py), when asked
    tasks_error: str = ""  # why they were not, when they were asked for and could not be
    tasks_peak_rss_mb: float = 0.0  # the process's peak once the tasks were answered (lm-eval imported, ...)


# Long generations, to see collapse (health.py): as many tokens as the KV cache leaves after the prompt, at most.
HEALTH_TOKENS = 256
# Short, since a bundle's KV cache may be small (the demo's 128 tokens are 128 bytes).
CHAT_TURNS = ("Hi", "Go on")
CHAT_REPLY_TOKENS = 8
_CHAT_FAILED = 3  # the child's exit status when the conversation failed
# The children's result files.
_RUN_FILE, _TASKS_FILE = "run.json", "tasks.json"
NO_TASKS = TaskRequest((), 0)
# What the server that forks task processes imports once (lm-eval's evaluator and task index take 1.2 s; `datasets`
# patches scipy.io for streaming as it loads a task's data, which imported it in each task process: 0.16 s).
TASK_PRELOAD = ("litert_lm", "lm_eval.evaluator", "lm_eval.tasks", "lm_eval.api.model", "scipy.io", __name__)
# XNNPACK's packed weights, shared by the bundle's signatures, kept in memory rather than in a file ("" would write
# one beside the bundle, as large as the packed model: 9 GB and more for a float 2B bundle, which filled the disk).
# Measured on the Qwen2.5-0.5B shape's bundles: the same peak RSS as a file (0.76 GB int8, 10.46 GB weight-only
# int8), loaded faster (21.0 s against 32.3 s weight-only); ":nocache" packs per signature: 2.23 and 14.46 GB.
WEIGHT_CACHE = ":memory"


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
        lists = ("texts", "decoded_tokens", "chat_replies", "tasks", "tasks_error", "tasks_peak_rss_mb")
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


@dataclass(frozen=True)
class BundleRequest:
    """What a run of a bundle does after its greedy generations: the conversation, the tasks, and whom to tell
    that the generations (the timed part) are done."""

    chat: bool = False
    tasks: TaskRequest = NO_TASKS
    on_generated: Callable[[], None] = field(default=lambda: None, compare=False)


def _generate(
    bundle: Path, spec: BundleSpec, texts: _Texts, prompts: np.ndarray, request: BundleRequest
) -> tuple[RuntimeRun, GenerationHealth]:
    """Greedy generations from ``prompts`` as long as the KV cache allows after a prompt and its start token, and
    their health."""
    budget = min(HEALTH_TOKENS, spec.context_length - prompts.shape[1] - 1)
    run = run_bundle(bundle, [texts.prompt(p) for p in prompts], budget, request, spec.context_length)
    return run, generation_health([texts.tokens(t) for t in run.texts], run.decoded_tokens, budget)


def check_bundle(
    bundle: Path,
    spec: BundleSpec,
    prompts: np.ndarray,
    interpreter: np.ndarray,
    float_model: np.ndarray,
    request: BundleRequest = BundleRequest(),
) -> RuntimeCheck:
    """Generate in LiteRT-LM after ``prompts`` (token ids, given as text) as many tokens as the KV cache allows,
    compare their start with ``interpreter`` and ``float_model`` (the greedy tokens from each prompt), and score
    their health; then answer ``request``'s tasks. The runtime prepends its start token to every prompt, so with
    one, only prompts that begin with it are like for like (given without it): the first window of the eval text
    at least, as the tokenizer adds it there; agreements are on those. A bundle with a chat template converses."""
    texts = _Texts(spec)
    chosen = [i for i, prompt in enumerate(prompts) if texts.start is None or prompt[0] == texts.start]
    request = replace(request, chat=spec.chat_template is not None)
    run, health = _generate(bundle, spec, texts, prompts, request)

    def agreement(expected: np.ndarray) -> float:
        return float(np.mean([_agreement(run.texts[i], texts.text(expected[i])) for i in chosen]))

    return RuntimeCheck(run, agreement(interpreter), agreement(float_model), health)


def float_generations(
    bundle: Path, spec: BundleSpec, prompts: np.ndarray, tasks: TaskRequest = NO_TASKS
) -> tuple[RuntimeRun, GenerationHealth]:
    """The float bundle's generations from ``prompts`` (with the runtime's own measurements, its peak memory among
    them) and their health, as ``check_bundle`` scores a recipe's; then ``tasks``."""
    return _generate(bundle, spec, _Texts(spec), prompts, BundleRequest(tasks=tasks))


def failure_reason(stderr: str, returncode: int) -> str:
    """Why a fresh process running LiteRT-LM failed: the runtime's first error line (glog's "E0000 ...
    file.cc:123] message"; the later ones are its teardown complaining), else Python's last word."""
    errors = [line.split("] ", 1)[-1] for line in stderr.splitlines() if line.startswith("E0000")]
    return errors[0] if errors else last_word(stderr, returncode)


def _following(lines: Iterable[str], bundle: Path) -> Iterator[str]:
    """A child's stderr as it comes, less its task progress lines, which are logged (the step's log, and
    ``edge-quant run``'s live view)."""
    for line in lines:
        if line.startswith(PROGRESS):
            log.info("%s (%s)", line.removeprefix(PROGRESS).strip(), bundle.name)
        else:
            yield line


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_bundle(
    bundle: Path,
    prompts: list[str],
    num_tokens: int,
    request: BundleRequest = BundleRequest(),
    max_tokens: int | None = None,
) -> RuntimeRun:
    """Generate ``num_tokens`` greedily after each of ``prompts`` in a fresh process and, as ``request`` asks, hold
    the conversation of CHAT_TURNS with the bundle's chat template; tell ``request.on_generated``; then answer
    lm-eval's tasks in another (``answer_tasks``). Engines hold ``max_tokens`` tokens (the bundle's KV cache; None:
    the runtime's default). The children's files go to a scratch folder beside the bundle, removed when the run
    ends."""
    tasks = request.tasks
    with tempfile.TemporaryDirectory(dir=bundle.parent, prefix=f".{bundle.name}.run-") as folder:
        scratch = Path(folder)
        (scratch / "prompts.json").write_text(json.dumps(prompts))
        command = [sys.executable, "-m", __name__, str(bundle), "--prompts-file", str(scratch / "prompts.json")]
        command += ["--tokens", str(num_tokens), "--scratch-dir", folder] + (["--chat"] if request.chat else [])
        command += ["--max-tokens", str(max_tokens)] if max_tokens else []
        pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, "errors": "replace"}
        with subprocess.Popen(command, **pipes) as child:
            stderr = "".join(_following(child.stderr, bundle))
        request.on_generated()
        generated = _read(scratch / _RUN_FILE)
        answered = answer_tasks(bundle, tasks, max_tokens, scratch) if generated and tasks.names else None
    reason = failure_reason(stderr, child.returncode)
    if child.returncode == _CHAT_FAILED:
        raise BundleRejectedError(f"LiteRT-LM's Conversation API failed with the chat template of {bundle}: {reason}")
    if generated is None:
        raise BundleRejectedError(f"LiteRT-LM could not run {bundle}: {reason}")
    run = RuntimeRun(**{**generated, **_task_outcome(tasks, answered, bundle)})
    if not any(run.texts):  # one prompt may end where the model stops at once: that is an early stop (health.py)
        raise BundleRejectedError(f"LiteRT-LM generated no tokens from {bundle} (it loaded, and said nothing wrong).")
    if request.chat and not all(run.chat_replies):
        raise BundleRejectedError(
            f"LiteRT-LM's Conversation API replied nothing with the chat template of {bundle} (replies: "
            f"{run.chat_replies}), though raw sessions generate."
        )
    return run


def _task_outcome(tasks: TaskRequest, answered: dict | None, bundle: Path) -> dict:
    if answered is None:
        return {}
    error = answered["error"] and f"tasks {', '.join(tasks.names)} on {bundle}: {answered['error']}"
    scores = tuple(TaskScore(**score) for score in answered["scores"])
    return {"tasks": scores, "tasks_error": error, "tasks_peak_rss_mb": answered.get("peak_rss_mb", 0.0)}


def _converse(engine) -> list[str]:
    """The replies to CHAT_TURNS in one conversation, greedy, as an app's chat would get them."""
    import litert_lm

    with engine.create_conversation(
        sampler_config=litert_lm.SamplerConfig(top_k=1), max_output_tokens=CHAT_REPLY_TOKENS
    ) as conversation:
        replies = [conversation.send_message(turn) for turn in CHAT_TURNS]
    return ["".join(getattr(part, "text", "") for part in reply.contents) for reply in replies]


def _engine(bundle: Path, max_tokens: int | None, benchmark: bool = False, threads: int | None = None):
    import litert_lm

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    return litert_lm.Engine(
        str(bundle),
        backend=litert_lm.Backend.CPU(thread_count=threads),
        max_num_tokens=max_tokens,
        enable_benchmark=benchmark,
        cache_dir=WEIGHT_CACHE,
    )


def start_task_server() -> ForkServer:
    """This process's server of task processes, started now if none runs, so that it imports lm-eval beside this
    process's work; ``answer_tasks`` starts it otherwise."""
    return fork_server(TASK_PRELOAD)


def answer_tasks(bundle: Path, tasks: TaskRequest, max_tokens: int | None, scratch: Path) -> dict:
    """``tasks`` answered by ``bundle`` in a fresh process forked from the task server, its stderr read as it comes:
    ``{"scores": [...], "error": why there are none, "peak_rss_mb": the process's peak}``."""
    # Absolute paths: the process works in the folder this one worked in when it started the server.
    arguments = {"bundle": str(bundle.resolve()), "tasks": asdict(tasks), "max_tokens": max_tokens}
    try:
        forked = start_task_server().run(
            task_process, {**arguments, "scratch": str(scratch.resolve())}, lambda lines: _following(lines, bundle)
        )
    except ForkServerError as error:  # killed, with the task process: the tasks fail, the check stands
        return {"scores": [], "error": str(error)}
    return _read(scratch / _TASKS_FILE) or {"scores": [], "error": failure_reason(forked.stderr, forked.returncode)}


def task_process(bundle: str, tasks: dict, max_tokens: int | None, scratch: str) -> None:
    """A task process (its stderr the parent's to read): the scores, or why there are none, in the scratch folder's
    tasks file; a task that cannot run fails the tasks only."""
    request = TaskRequest(**{**tasks, "names": tuple(tasks["names"])})
    with _engine(Path(bundle), max_tokens, threads=request.threads_for(Path(bundle).stat().st_size)) as engine:
        try:
            scores = score_tasks(engine, request, max_tokens, Path(scratch))
            answered = {"scores": [asdict(score) for score in scores], "error": ""}
        except Exception as error:  # lm-eval's or the runtime's, about a task: one line, as for a failed process
            answered = {"scores": [], "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    (Path(scratch) / _TASKS_FILE).write_text(json.dumps({**answered, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    die_with_parent()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompts-file", type=Path, required=True, help="a JSON list of prompts")
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--scratch-dir", type=Path, required=True, help="where the results are written")
    parser.add_argument("--chat", action="store_true", help="then converse with the bundle's chat template")
    parser.add_argument("--max-tokens", type=int, help="the engine's token budget (the bundle's KV cache)")
    args = parser.parse_args()
    import litert_lm

    texts, benchmarks = [], []
    with _engine(args.bundle, args.max_tokens, benchmark=True) as engine:
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
        (args.scratch_dir / _RUN_FILE).write_text(json.dumps(asdict(run)))


if __name__ == "__main__":
    main()
