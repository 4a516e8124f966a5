"""Task accuracy in LiteRT-LM: lm-evaluation-harness tasks answered by a bundle in the runtime itself, as an app
runs it, in a fresh process of their own after the runtime's check of the bundle (``litert_lm.answer_tasks``).

lm-eval reads the tasks, sends its requests and scores the answers; the model it asks is ``LiteRtLmHarness``:

- a log-likelihood request (a multiple choice sends one per choice) is a new session that prefills the context
  and scores the continuation with ``Session.run_text_scoring``: the sum of the natural-log probabilities of its
  tokens, at temperature 1, as the runtime computes them;
- a generation request is a new greedy session that prefills the context and decodes at most the task's
  ``max_gen_toks`` tokens, cut at the first of its stop strings.

The runtime prepends the bundle's start token to a session's first prefill, as it does for an app. It offers no
rolling log-likelihood, so lm-eval's perplexity tasks are refused by name. A context longer than the bundle's
token budget (its KV cache) less the continuation is cut from the left, as lm-eval's own models cut it.

    litert_lm.answer_tasks(Path("model.litertlm"), TaskRequest(("demo_cloze",), 50), 128, Path("/tmp/scratch"))

Tasks are lm-eval's registry names (their data downloaded by ``datasets`` when online), YAML files or folders of
them (a local task: YAML + JSONL, as lm-eval allows), or the demo's two (``demo/make_tasks.py``): ``demo_cloze``,
the last word of each held-out sentence among itself and three shuffles of its letters (accuracy), and
``demo_completion``, that word's second half generated after its first (exact match).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_TASK_DIR = Path(__file__).parent.parent / "demo" / "tasks"
DEMO_TASK_FILES = {"demo_cloze": DEMO_TASK_DIR / "cloze.jsonl", "demo_completion": DEMO_TASK_DIR / "completion.jsonl"}
# Metrics that are not a task's score: lm-eval's bookkeeping in its results.
_NOT_SCORES = ("alias", "samples")
# A smaller bundle answers tasks on one thread: each request's work is too small to share (the demo's 1.4-3.7 MB
# bundles: 0.9 s of CPU in 1.0 s on one thread, 1.9 s in 1.3 s on two; measured in one process, tasks only).
ONE_THREAD_BYTES = 64 << 20
# The lines that say how far a task got (the parent passes them on to the step's log), at most one per task this
# often.
PROGRESS, _PROGRESS_EVERY_S = "task progress: ", 15.0


@dataclass(frozen=True)
class TaskRequest:
    names: tuple[str, ...]  # lm-eval tasks; empty: none
    limit: int  # samples per task; 0: all
    # Of the engine answering them, for a bundle of at least ONE_THREAD_BYTES; None: the runtime's default, which
    # oversubscribes 2 cores (the demo's tasks took 2.9 s of CPU in 1.9 s with it, 1.9 s in 1.3 s with 2 threads).
    threads: int | None = None

    def threads_for(self, bundle_bytes: int) -> int | None:
        return 1 if bundle_bytes < ONE_THREAD_BYTES else self.threads


class TaskRunError(RuntimeError):
    """lm-eval or LiteRT-LM could not run the tasks; the message names the bundle and the reason."""


@dataclass(frozen=True)
class TaskScore:
    """One task's score in the runtime: its first metric (accuracy, exact match...) and that metric's standard
    error over the samples scored."""

    task: str
    metric: str
    value: float
    stderr: float
    samples: int
    seconds: float = 0.0  # lm-eval's run of the task in LiteRT-LM (a group's tasks share their group's run)


def _local(name: str, body: dict) -> dict:
    """A task config over the demo's JSONL file of ``name`` (lm-eval's ``json`` dataset: read locally)."""
    files = {"test": str(DEMO_TASK_FILES[name])}
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test", **body}


def demo_task_configs() -> dict[str, dict]:
    """The demo's tasks as lm-eval task configs, reading the JSONL files the package ships."""
    return {
        "demo_cloze": _local(
            "demo_cloze",
            {
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_choice": "choices",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            },
        ),
        "demo_completion": _local(
            "demo_completion",
            {
                "output_type": "generate_until",
                "doc_to_text": "{{prompt}}",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": [" ", ".", ",", "\n"], "max_gen_toks": 16, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            },
        ),
    }


def _harness_class():
    """``LiteRtLmHarness``, defined where lm-eval is imported: the parent process never imports it."""
    from lm_eval.api.model import LM

    class LiteRtLmHarness(LM):
        def __init__(self, engine, max_tokens: int):
            super().__init__()
            self.engine, self.max_tokens = engine, max_tokens
            self.task, self.started, self.reported = "", 0.0, 0.0

        def start(self, task: str) -> None:
            self.task, self.started = task, time.monotonic()

        def progress(self, done: int, total: int) -> None:
            """A line for the parent at the first and the last request, and every _PROGRESS_EVERY_S between."""
            now = time.monotonic()
            if done in (0, total) or now - self.reported >= _PROGRESS_EVERY_S:
                self.reported = now
                elapsed = now - self.started
                print(f"{PROGRESS}{self.task}: {done} of {total} requests, {elapsed:.0f} s", file=sys.stderr)
                sys.stderr.flush()

        def _fit(self, context: str, reserved: int) -> str:
            """``context`` cut from the left so that it and ``reserved`` tokens (and a start token) fit."""
            tokens = self.engine.tokenize(context)
            room = max(self.max_tokens - reserved - 1, 1)
            return context if len(tokens) <= room else self.engine.detokenize(tokens[-room:])

        def _scoring_prefill(self, context: str) -> str:
            """What to prefill so that text scoring sees ``context``. LiteRT-LM 0.18's first ``run_text_scoring``
            after a prefill rewinds the KV cache one position too far (google-ai-edge/LiteRT-LM#3561): it scores
            as if the prefill's second-to-last token were not there (``tests/test_bundle.py`` pins that, against
            the float PyTorch model). So a filler token goes before the context's last one, where it is dropped;
            the filler is the first text that stays one token of its own between them."""
            tokens = self.engine.tokenize(context)
            if not tokens:
                return context
            head, last = self.engine.detokenize(tokens[:-1]), self.engine.detokenize(tokens[-1:])
            for filler in (last, " ", "\n"):
                padded = self.engine.tokenize(head + filler + last)
                if len(padded) == len(tokens) + 1 and padded[:-2] == tokens[:-1] and padded[-1] == tokens[-1]:
                    return head + filler + last
            raise TaskRunError(f"cannot score after {context[-40:]!r}: no filler keeps its last token whole.")

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            results = []
            self.progress(0, len(requests))
            for request in requests:
                context, continuation = request.args[:2]
                context = self._fit(context, len(self.engine.tokenize(continuation)) + 1)
                with self.engine.create_session(apply_prompt_template=False) as session:
                    session.run_prefill([self._scoring_prefill(context)])
                    scored = session.run_text_scoring([continuation])
                results.append((float(scored.scores[0]), False))  # greedy or not is not asked by acc
                self.progress(len(results), len(requests))
            return results

        def generate_until(self, requests) -> list[str]:
            import litert_lm

            results = []
            self.progress(0, len(requests))
            for request in requests:
                context, options = request.args[:2]
                budget = int(options.get("max_gen_toks", 32))
                until = [stop for stop in options.get("until", []) if stop]
                with self.engine.create_session(
                    apply_prompt_template=False,
                    sampler_config=litert_lm.SamplerConfig(top_k=1),
                    max_output_tokens=budget,
                ) as session:
                    session.run_prefill([self._fit(context, budget)])
                    text = "".join(session.run_decode().texts)
                cut = min((i for i in (text.find(stop) for stop in until) if i >= 0), default=len(text))
                results.append(text[:cut])
                self.progress(len(results), len(requests))
            return results

        def loglikelihood_rolling(self, requests) -> list[float]:
            raise TaskRunError(
                "LiteRT-LM scores a continuation after a prefilled context, not a whole text (lm-eval's perplexity "
                "tasks); choose a multiple-choice or generation task."
            )

    return LiteRtLmHarness


def _tasks_for(names: list[str], scratch: Path):
    """lm-eval's task names for ``names`` (the tasks of the demo's, of local YAML files and folders, the registry's)
    and the TaskManager that indexes them (lm-eval's own tasks only when one is named). The demo's go through the
    same path as a user's local task: YAML files, written into ``scratch``."""
    import yaml
    from lm_eval.tasks import TaskManager

    demo = demo_task_configs()
    for name in set(names) & set(demo):
        (scratch / f"{name}.yaml").write_text(yaml.safe_dump(demo[name]))
    paths = [
        (scratch / f"{n}.yaml") if n in demo else Path(n).resolve() for n in names if n in demo or Path(n).exists()
    ]
    registry = [name for name in names if name not in demo and not Path(name).exists()]
    folders = sorted({str(path if path.is_dir() else path.parent) for path in paths})
    manager = TaskManager(include_path=folders or None, include_defaults=bool(registry), verbosity="ERROR")

    def named_by_a_path(entry: dict) -> bool:
        source = entry.get("yaml_path")
        return isinstance(source, str) and any(path in (Path(source), *Path(source).parents) for path in paths)

    local = [name for name, entry in manager.task_index.items() if entry["type"] == "task" and named_by_a_path(entry)]
    return local + registry, manager


def _score(name: str, result: dict, samples: int, seconds: float) -> TaskScore:
    metric_key = next(
        k for k, v in result.items() if "_stderr" not in k and k not in _NOT_SCORES and not isinstance(v, str)
    )
    stderr = result.get(metric_key.replace(",", "_stderr,", 1))
    value = float(result[metric_key])
    return TaskScore(name, metric_key.split(",")[0], value, float(stderr or 0.0), samples, seconds)


def _scored(harness, task: str, manager, limit: int) -> list[TaskScore]:
    """One task (or group) through lm-eval, timed on its own."""
    import lm_eval.evaluator

    harness.start(task)
    results = lm_eval.evaluator.simple_evaluate(
        model=harness,
        tasks=[task],
        limit=limit or None,
        task_manager=manager,
        bootstrap_iters=1000,  # for metrics without a closed-form error; a mean's is computed
        log_samples=False,
        torch_random_seed=None,
        verbosity="ERROR",
    )
    seconds, samples = time.monotonic() - harness.started, results.get("n-samples", {})
    return [
        _score(name, result, samples.get(name, {}).get("effective", 0), seconds)
        for name, result in results["results"].items()
    ]


def _local_files_only(cache: Path) -> None:
    """``datasets`` looks nothing up online and caches what it reads in ``cache``, unless the environment says
    otherwise. It reads these settings when imported, which the task server did before this process was forked
    from it (``litert_lm.start_task_server``): so they are set on its config, where it reads them for each load."""
    import datasets.config

    if "HF_DATASETS_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ:
        datasets.config.HF_HUB_OFFLINE = True
    if "HF_DATASETS_CACHE" not in os.environ:
        datasets.config.HF_DATASETS_CACHE = cache
        datasets.config.DOWNLOADED_DATASETS_PATH = cache / datasets.config.DOWNLOADED_DATASETS_DIR
        datasets.config.EXTRACTED_DATASETS_PATH = cache / datasets.config.EXTRACTED_DATASETS_DIR


def score_tasks(engine, request: TaskRequest, max_tokens: int, scratch: Path) -> list[TaskScore]:
    """``request``'s tasks answered by ``engine`` (a LiteRT-LM engine of at most ``max_tokens`` tokens), each
    timed on its own; the demo's task files, and the datasets cache of local tasks, go to ``scratch``."""
    if all(Path(task).exists() or task in DEMO_TASK_FILES for task in request.names):
        _local_files_only(scratch / "datasets")
    import lm_eval.evaluator

    # lm-eval's report of the environment imports torch (5 s, more than the demo's tasks take) for results of
    # which only the scores are kept.
    lm_eval.evaluator.add_env_info = lambda results: None
    tasks, manager = _tasks_for(list(request.names), scratch)
    harness = _harness_class()(engine, max_tokens)
    return [score for task in tasks for score in _scored(harness, task, manager, request.limit)]
