"""Run a ``.tflite`` in the LiteRT interpreter and compare it with the float PyTorch model.

Evaluation is teacher-forced over fixed windows of the held-out text. In each
window the first ``prefill_len`` tokens go through the prefill signature, and
every later token through the decode signature with the KV cache carried from
call to call, exactly as an on-device runtime would. The float reference runs
the same windows through the PyTorch model the checkpoint rebuilds to, so every
metric compares like with like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.convert import ExportSettings, atomic_path
from edge_quant_pipeline.weights import TfliteModel


@dataclass(frozen=True)
class EvalSettings:
    max_tokens: int = 2048  # of the eval text, cut into windows of kv_cache_len tokens
    num_threads: int = 2


class RuntimeRejectedError(RuntimeError):
    """The LiteRT interpreter could not prepare or run the model."""


def tokenize(text_path: Path, checkpoint_dir: Path, vocab_size: int) -> np.ndarray:
    """With the checkpoint's ``tokenizer.json`` when it has one; byte-level otherwise (the demo model)."""
    tokenizer_file = checkpoint_dir / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        return np.array(Tokenizer.from_file(str(tokenizer_file)).encode(text_path.read_text()).ids, np.int32)
    if vocab_size < 256:
        raise ValueError(
            f"{checkpoint_dir}: no tokenizer.json, and a vocabulary of {vocab_size} is too small for byte-level "
            "evaluation. Save the model's tokenizer next to it (tokenizer.save_pretrained)."
        )
    return np.frombuffer(text_path.read_bytes(), dtype=np.uint8).astype(np.int32)


def eval_windows(tokens: np.ndarray, window_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping windows of ``window_len`` tokens, shape (windows, window_len)."""
    usable = min(len(tokens), max_tokens) // window_len * window_len
    if usable == 0:
        raise ValueError(f"the eval text has {len(tokens)} tokens; at least {window_len} are needed (one window).")
    return tokens[:usable].reshape(-1, window_len)


def float_reference_logits(model, model_config, windows: np.ndarray, settings: ExportSettings) -> np.ndarray:
    """Logits of the PyTorch model for every window position, shape (windows, window_len, vocab)."""
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils

    window_len = windows.shape[1]
    positions = torch.arange(window_len, dtype=torch.int)
    logits = []
    with torch.inference_mode():
        for window in windows:
            kv = kv_utils.KVCache.from_model_config(settings.kv_cache_len, model_config)
            out = model(torch.from_numpy(window)[None].int(), positions, kv)
            logits.append(out["logits"][0].float().numpy())
    return np.stack(logits)


@dataclass(frozen=True)
class FloatReference:
    """What the float PyTorch model does on the eval text, saved as one ``.npz``.

    ``windows``/``logits``: teacher-forced logits per window position.
    ``prompts``/``continuations``: its greedy continuations of a few prompts.
    """

    path: Path
    perplexity: float
    eval_tokens: int

    def load(self, *keys: str) -> dict[str, np.ndarray]:
        """The arrays named (all by default); an ``.npz`` reads only the ones asked for."""
        with np.load(self.path) as data:
            return {key: data[key] for key in keys or data.files}


def generation_prompts(windows: np.ndarray, settings: ExportSettings, count: int) -> np.ndarray:
    """The first ``prefill_len`` tokens of the first windows: one prefill call each."""
    return windows[:count, : settings.prefill_len]


def generation_length(settings: ExportSettings) -> int:
    return min(64, settings.kv_cache_len - settings.prefill_len)


def float_greedy(model, model_config, prompts: np.ndarray, settings: ExportSettings) -> np.ndarray:
    """Greedy continuations by the PyTorch model, with its KV cache, shape (prompts, tokens)."""
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils

    continuations = []
    with torch.inference_mode():
        for prompt in prompts:
            kv = kv_utils.KVCache.from_model_config(settings.kv_cache_len, model_config)
            out = model(torch.from_numpy(prompt)[None].int(), torch.arange(len(prompt), dtype=torch.int), kv)
            tokens = []
            for pos in range(len(prompt), len(prompt) + generation_length(settings)):
                tokens.append(int(out["logits"][0, -1].argmax()))
                out = model(
                    torch.tensor([[tokens[-1]]], dtype=torch.int), torch.tensor([pos], dtype=torch.int), out["kv_cache"]
                )
            continuations.append(tokens)
    return np.array(continuations, dtype=np.int32)


def build_float_reference(
    model, model_config, tokens: np.ndarray, settings: ExportSettings, max_tokens: int, output: Path, prompts: int = 4
) -> FloatReference:
    windows = eval_windows(tokens, settings.kv_cache_len, max_tokens)
    logits = float_reference_logits(model, model_config, windows, settings)
    prompt_tokens = generation_prompts(windows, settings, prompts)
    continuations = float_greedy(model, model_config, prompt_tokens, settings)
    with atomic_path(output) as partial:
        np.savez(partial, windows=windows, logits=logits, prompts=prompt_tokens, continuations=continuations)
    return FloatReference(output, perplexity(logits, windows), int(windows.size))


def empty_kv_cache(runner) -> dict[str, np.ndarray]:
    """Zeroed ``kv_cache_*`` inputs of a signature runner: the state before a sequence starts."""
    inputs = runner.get_input_details()
    return {name: np.zeros(d["shape"], np.float32) for name, d in inputs.items() if name.startswith("kv_cache_")}


class InterpreterSession:
    """Prefill and decode signatures of one ``.tflite``, with the KV cache carried between calls."""

    def __init__(self, tflite: Path, settings: ExportSettings, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.tflite, self.prefill_len = tflite, settings.prefill_len
        try:
            interpreter = Interpreter(model_path=str(tflite), num_threads=num_threads)
            interpreter.allocate_tensors()
            self._prefill = interpreter.get_signature_runner(settings.prefill_signature)
            self._decode = interpreter.get_signature_runner("decode")
        except (RuntimeError, ValueError) as error:
            raise RuntimeRejectedError(f"LiteRT could not prepare {tflite}: {error}") from error
        self._empty_kv = empty_kv_cache(self._prefill)
        self._kv = self._empty_kv

    def _run(self, runner, **inputs) -> np.ndarray:
        try:
            out = runner(**inputs, **self._kv)
        except (RuntimeError, ValueError) as error:
            raise RuntimeRejectedError(f"LiteRT failed to run {self.tflite}: {error}") from error
        self._kv = {name: out[name] for name in self._empty_kv}
        return out["logits"][0]

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        """Start a new sequence; logits for every prompt position, shape (prefill_len, vocab)."""
        self._kv = self._empty_kv
        return self._run(
            self._prefill, tokens=tokens[None].astype(np.int32), input_pos=np.arange(self.prefill_len, dtype=np.int32)
        )

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._run(self._decode, tokens=np.array([[token]], np.int32), input_pos=np.array([position], np.int32))[
            0
        ]


def teacher_forced_logits(session: InterpreterSession, windows: np.ndarray) -> np.ndarray:
    """Logits for every window position: prefill the first tokens, then decode the true ones."""
    p = session.prefill_len
    return np.stack(
        [
            np.concatenate(
                [session.prefill(w[:p])] + [session.decode(int(w[pos]), pos)[None] for pos in range(p, len(w))]
            )
            for w in windows
        ]
    )


def greedy(session: InterpreterSession, prompts: np.ndarray, length: int) -> np.ndarray:
    continuations = []
    for prompt in prompts:
        logits, tokens = session.prefill(prompt)[-1], []
        for pos in range(len(prompt), len(prompt) + length):
            tokens.append(int(logits.argmax()))
            logits = session.decode(tokens[-1], pos)
        continuations.append(tokens)
    return np.array(continuations, dtype=np.int32)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
    """exp of the mean next-token negative log-likelihood; the last position has no target."""
    log_probs = _log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


@dataclass(frozen=True)
class Fidelity:
    """Teacher-forced agreement with the float model over the same windows."""

    perplexity: float
    perplexity_ratio: float  # vs the PyTorch float model
    mean_kl: float  # KL(float || candidate) of next-token distributions, nats
    p99_kl: float
    max_kl: float
    top1_agreement: float  # fraction of positions whose most likely token matches float's
    delta_p_correct: float  # mean change in the probability of the true next token
    logits_sqnr_db: float  # signal-to-quantization-noise ratio of the logits


def compare(logits: np.ndarray, reference: np.ndarray, windows: np.ndarray) -> Fidelity:
    log_p, log_q = _log_softmax(reference), _log_softmax(logits)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)
    targets = windows[:, 1:, None]
    p_correct = np.exp(np.take_along_axis(log_p[:, :-1], targets, axis=-1))
    q_correct = np.exp(np.take_along_axis(log_q[:, :-1], targets, axis=-1))
    noise = np.square(logits.astype(np.float64) - reference).sum()
    ppl = perplexity(logits, windows)
    return Fidelity(
        perplexity=ppl,
        perplexity_ratio=ppl / perplexity(reference, windows),
        mean_kl=float(kl.mean()),
        p99_kl=float(np.percentile(kl, 99)),
        max_kl=float(kl.max()),
        top1_agreement=float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        delta_p_correct=float((q_correct - p_correct).mean()),
        logits_sqnr_db=float(10 * np.log10(np.square(reference.astype(np.float64)).sum() / noise))
        if noise
        else float("inf"),
    )


@dataclass(frozen=True)
class GenerationAgreement:
    """Free-running greedy decoding compared token by token with the float model's."""

    agreement: float  # fraction of generated tokens equal to float's at the same position
    first_divergence: float  # mean index of the first differing token (= length if none)
    min_first_divergence: int


def compare_generation(tokens: np.ndarray, reference: np.ndarray) -> GenerationAgreement:
    same = tokens == reference
    first = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    return GenerationAgreement(float(same.mean()), float(np.mean(first)), int(min(first)))


@dataclass(frozen=True)
class Evaluation:
    """Everything measured for one (model, recipe); flat, so it goes straight into a table."""

    file_bytes: int
    file_ratio: float  # float .tflite bytes / this file's bytes
    weight_bytes: int
    weight_ratio: float  # float weight bytes / this model's weight bytes
    perplexity: float
    perplexity_ratio: float
    mean_kl: float
    p99_kl: float
    max_kl: float
    top1_agreement: float
    delta_p_correct: float
    logits_sqnr_db: float
    generation_agreement: float
    first_divergence: float
    min_first_divergence: int
    prefill_ms: float
    decode_tokens_per_s: float
    peak_rss_mb: float
    eval_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def evaluate(
    candidate: TfliteModel,
    float_model: TfliteModel,
    reference: FloatReference,
    settings: ExportSettings,
    num_threads: int,
) -> Evaluation:
    from edge_quant_pipeline.runtime_profile import profile_in_subprocess

    data = reference.load()
    session = InterpreterSession(candidate.path, settings, num_threads)
    fidelity = compare(teacher_forced_logits(session, data["windows"]), data["logits"], data["windows"])
    generation = compare_generation(
        greedy(session, data["prompts"], data["continuations"].shape[1]), data["continuations"]
    )
    runtime = profile_in_subprocess(candidate.path, settings, num_threads)
    return Evaluation(
        file_bytes=candidate.file_bytes,
        file_ratio=float_model.file_bytes / candidate.file_bytes,
        weight_bytes=candidate.weight_bytes,
        weight_ratio=float_model.weight_bytes / candidate.weight_bytes,
        **asdict(fidelity),
        generation_agreement=generation.agreement,
        first_divergence=generation.first_divergence,
        min_first_divergence=generation.min_first_divergence,
        **asdict(runtime),
        eval_tokens=int(data["windows"].size),
    )
