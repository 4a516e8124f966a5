"""Everything measured for one (model, recipe): its ``.tflite`` in the LiteRT interpreter against the float model.

Teacher-forced scoring runs over the same windows of the held-out text as the float reference, chunk by chunk
through the prefill signature with the KV cache carried across chunks, window by window against the stored
reference, so memory holds one window of logits. Free-running greedy generation through the decode signature
proves the decode path. Latency and the interpreter's own memory are measured in a fresh process.
The LiteRT-LM bundle of the same file then generates from the same prompts in LiteRT-LM itself, in a fresh
process too (``litert_lm.py``), and is compared with the interpreter's generation; once it runs, it answers the
configured lm-eval tasks in another (``tasks.py``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.evaluate.bundle import BundleSpec
from edge_quant_pipeline.evaluate.export_proof import ExportProof
from edge_quant_pipeline.evaluate.health import GenerationHealth
from edge_quant_pipeline.evaluate.litert_lm import BundleRejectedError, BundleRequest, RuntimeCheck, check_bundle
from edge_quant_pipeline.evaluate.metrics import FidelityAccumulator, compare_generation
from edge_quant_pipeline.evaluate.profile import profile_in_subprocess
from edge_quant_pipeline.evaluate.reference import FloatReference
from edge_quant_pipeline.evaluate.tasks import TaskRequest, TaskScore
from edge_quant_pipeline.memory import PeakMemory
from edge_quant_pipeline.runtime.session import InterpreterSession
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.timing import computing, timed_alone
from edge_quant_pipeline.weights import TfliteModel


@dataclass(frozen=True)
class Evaluation:
    """Everything measured for one (model, recipe); flat, so it goes straight into a table."""

    file_bytes: int
    file_ratio: float  # float .tflite bytes / this file's bytes
    weight_bytes: int
    weight_ratio: float  # float weight bytes / this model's weight bytes
    perplexity: float
    perplexity_ratio: float
    perplexity_ratio_error: float  # standard errors, as metrics.Fidelity computes them
    mean_kl: float
    mean_kl_error: float
    median_kl: float
    p99_kl: float
    p999_kl: float
    max_kl: float
    top1_agreement: float
    top1_agreement_error: float
    delta_p_correct: float
    delta_p_correct_error: float
    rms_delta_p: float
    rms_delta_p_error: float
    logits_sqnr_db: float
    generation_agreement: float
    first_divergence: float
    min_first_divergence: int
    prefill_ms: float  # the interpreter's, in a fresh process, alone on the machine (profile.py)
    prefill_spread: float
    decode_tokens_per_s: float
    decode_spread: float
    peak_rss_mb: float
    eval_tokens: int
    eval_tokens_per_s: float  # teacher-forced scoring through the interpreter, comparison included
    prefill_tokens_per_s: float  # the interpreter's own prefill speed on this file (profile)
    eval_peak_rss_mb: float  # of the evaluating process while it scored and generated
    litert_lm: RuntimeCheck | None  # the bundle in LiteRT-LM; None when it failed, and ``litert_lm_error`` says why
    litert_lm_error: str
    tasks: tuple[TaskScore, ...]  # lm-eval tasks answered by the bundle in LiteRT-LM (tasks.py)
    tasks_error: str  # why they were not, when they were asked for and could not be
    float_baseline: FloatBaseline | None = None  # the float bundle in LiteRT-LM, the gates' reference there
    export_proof: ExportProof | None = None  # the float export's, for a family no test here covers

    def as_dict(self) -> dict[str, float | int | str]:
        nested = ("litert_lm", "tasks", "float_baseline", "export_proof")
        flat = {k: v for k, v in asdict(self).items() if k not in nested}
        baseline = self.float_baseline.as_dict() if self.float_baseline else {}
        proof = self.export_proof.as_dict() if self.export_proof else {}
        litert_lm = self.litert_lm.as_dict() if self.litert_lm else {}
        return {**flat, **litert_lm, **_task_dict(self.tasks), **baseline, **proof}

    def fidelity_table(self) -> str:
        """The agreement with the float model as llama.cpp's ``--kl-divergence`` prints it, each mean ± its
        standard error (markdown)."""
        rows = [
            ("perplexity ratio", f"{self.perplexity_ratio:.4f} ± {self.perplexity_ratio_error:.4f}"),
            ("mean KL", f"{self.mean_kl:.5f} ± {self.mean_kl_error:.5f}"),
            (
                "median / p99 / p99.9 / max KL",
                f"{self.median_kl:.5f} / {self.p99_kl:.4f} / {self.p999_kl:.4f} / {self.max_kl:.4f}",
            ),
            ("same top-1", f"{self.top1_agreement:.2%} ± {self.top1_agreement_error:.2%}"),
            ("mean Δp", f"{self.delta_p_correct:+.3%} ± {self.delta_p_correct_error:.3%}"),
            ("RMS Δp", f"{self.rms_delta_p:.3%} ± {self.rms_delta_p_error:.3%}"),
        ]
        return "\n".join(["| metric | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])

    def task_table(self) -> str:
        """Each task's score in LiteRT-LM ± its standard error beside the float model's, its change in points,
        and the samples scored (markdown)."""
        floats = {score.task: score for score in (self.float_baseline.scores if self.float_baseline else ())}

        def row(s: TaskScore) -> str:
            f = floats.get(s.task)
            beside = f"{f.value:.3f} ± {f.stderr:.3f} | {100 * (s.value - f.value):+.1f}" if f else " | "
            score = f"{s.value:.3f} ± {s.stderr:.3f}"
            return f"| {s.task} | {s.metric} | {score} | {beside} | {s.samples} | {s.seconds:.0f} |"

        head = [
            "| task | metric | score | float | change (points) | samples | seconds |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        return "\n".join([*head, *map(row, self.tasks)])


def _task_dict(scores: tuple[TaskScore, ...], prefix: str = "") -> dict[str, float]:
    """``<prefix>task_<task>_<metric>`` and its ``_error``, per task; ``<prefix>tasks_seconds``, their runs' time
    (once per run: a group's tasks share theirs)."""
    if not scores:
        return {}
    return {
        **{
            f"{prefix}task_{score.task}_{name}": value
            for score in scores
            for name, value in ((score.metric, score.value), (f"{score.metric}_error", score.stderr))
        },
        f"{prefix}tasks_seconds": sum({s.seconds for s in scores}),  # a group's tasks carry its run's time once
    }


@dataclass(frozen=True)
class FloatBaseline:
    """The float model's bundle in LiteRT-LM, what recipes are gated against in the runtime: its task scores and
    the health of its long generations from the evaluation's prompts; ``reason`` says why either is missing."""

    scores: tuple[TaskScore, ...]
    health: GenerationHealth | None
    reason: str

    def as_dict(self) -> dict[str, float]:
        health = {f"float_{name}": value for name, value in asdict(self.health).items()} if self.health else {}
        return {**_task_dict(self.scores, "float_"), **health}

    def table(self) -> str:
        rows = [
            f"| {s.task} | {s.metric} | {s.value:.3f} ± {s.stderr:.3f} | {s.samples} | {s.seconds:.0f} |"
            for s in self.scores
        ]
        return "\n".join(["| task | metric | float | samples | seconds |", "|---|---|---|---:|---:|", *rows])


@dataclass(frozen=True)
class Bundle:
    path: Path  # the .litertlm of the evaluated .tflite
    spec: BundleSpec


def score_windows(
    session: InterpreterSession, reference: FloatReference, windows: int | None = None
) -> FidelityAccumulator:
    """Teacher-forced scoring of the first ``windows`` windows of the eval text (None: all of them) against the
    stored float logits, chunk by chunk: memory holds one chunk of logits of each."""
    fidelity = FidelityAccumulator()
    with reference.logits() as stored:
        for w, window in enumerate(reference.tokens()["windows"][:windows]):
            for start, logits in session.score_chunks(window):
                targets = window[start + 1 : start + len(logits) + 1]
                fidelity.add(logits, stored.rows(w, start, len(logits)), targets)
    return fidelity


def evaluate(
    candidate: TfliteModel,
    float_model: TfliteModel,
    reference: FloatReference,
    settings: ExportSettings,
    num_threads: int,
    bundle: Bundle,
    tasks: TaskRequest,
) -> Evaluation:
    tokens = reference.tokens()
    with computing(), PeakMemory() as memory, InterpreterSession(candidate.path, settings, num_threads) as session:
        started = time.perf_counter()
        fidelity = score_windows(session, reference)
        scoring_seconds = time.perf_counter() - started
        length = tokens["continuations"].shape[1]
        generated = [session.greedy(prompt, length) for prompt in tokens["prompts"]]
    generation = compare_generation(np.stack(generated), tokens["continuations"])
    # The timed measurements in one stretch alone on the machine, so that this step waits for it once: the
    # interpreter's profile, then LiteRT-LM's benchmark (its generations); its tasks after them compute beside
    # others. Each in a fresh process, one after the other, once this one holds no runtime.
    with timed_alone() as generations_done:
        profile = profile_in_subprocess(candidate.path, settings, num_threads)
        try:
            request = BundleRequest(tasks=tasks, on_generated=generations_done)
            check = check_bundle(
                bundle.path, bundle.spec, tokens["prompts"], np.stack(generated), tokens["continuations"], request
            )
            litert_lm_error = ""
        except BundleRejectedError as error:
            check, litert_lm_error = None, str(error)
    return Evaluation(
        file_bytes=candidate.file_bytes,
        file_ratio=float_model.file_bytes / candidate.file_bytes,
        weight_bytes=candidate.weight_bytes,
        weight_ratio=float_model.weight_bytes / candidate.weight_bytes,
        **asdict(fidelity.result(reference.perplexity)),
        generation_agreement=generation.agreement,
        first_divergence=generation.first_divergence,
        min_first_divergence=generation.min_first_divergence,
        **asdict(profile),
        eval_tokens=int(tokens["windows"].size),
        eval_tokens_per_s=tokens["windows"].size / scoring_seconds,
        prefill_tokens_per_s=settings.prefill_len / profile.prefill_ms * 1000,
        eval_peak_rss_mb=memory.mb,
        litert_lm=check,
        litert_lm_error=litert_lm_error,
        tasks=check.run.tasks if check else (),
        tasks_error=check.run.tasks_error if check else "",
    )
