"""Run a ``.tflite`` in the LiteRT interpreter and compare it with the float PyTorch model.

Evaluation is teacher-forced over fixed windows of the held-out text. In each
window the first ``prefill_len`` tokens go through the prefill signature, and
every later token through the decode signature with the KV cache carried from
call to call, exactly as an on-device runtime would. The float reference runs
the same windows through the PyTorch model the checkpoint rebuilds to, so every
metric compares like with like.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.convert import ExportSettings
from edge_quant_pipeline.weights import TfliteModel


@dataclass(frozen=True)
class EvalSettings:
    max_tokens: int = 2048  # of the eval text, cut into windows of kv_cache_len tokens
    num_threads: int = 2


class RuntimeRejectedError(RuntimeError):
    """The LiteRT interpreter could not prepare or run the model."""


def byte_tokens(text_path: Path) -> np.ndarray:
    """The demo models are byte-level: token id == byte value."""
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
    """Eval windows and the PyTorch float logits for them, saved as one ``.npz``."""

    path: Path
    perplexity: float
    eval_tokens: int

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path) as data:
            return data["windows"], data["logits"]


def build_float_reference(model, model_config, eval_text: Path, settings: ExportSettings,
                          max_tokens: int, output: Path) -> FloatReference:
    windows = eval_windows(byte_tokens(eval_text), settings.kv_cache_len, max_tokens)
    logits = float_reference_logits(model, model_config, windows, settings)
    np.savez(output, windows=windows, logits=logits)
    return FloatReference(output, perplexity(logits, windows), int(windows.size))


@dataclass(frozen=True)
class InterpreterRun:
    logits: np.ndarray  # (windows, window_len, vocab)
    prefill_seconds: list[float]
    decode_seconds: list[float]


def _load_interpreter(tflite: Path, num_threads: int):
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(tflite), num_threads=num_threads)
        interpreter.allocate_tensors()
        return interpreter
    except (RuntimeError, ValueError) as error:
        raise RuntimeRejectedError(f"LiteRT could not prepare {tflite}: {error}") from error


def run_interpreter(tflite: Path, windows: np.ndarray, settings: ExportSettings, num_threads: int) -> InterpreterRun:
    interpreter = _load_interpreter(tflite, num_threads)
    prefill = interpreter.get_signature_runner(settings.prefill_signature)
    decode = interpreter.get_signature_runner("decode")
    kv_names = [name for name in prefill.get_input_details() if name.startswith("kv_cache_")]
    empty_kv = {name: np.zeros(prefill.get_input_details()[name]["shape"], np.float32) for name in kv_names}
    p = settings.prefill_len
    all_logits, prefill_seconds, decode_seconds = [], [], []
    try:
        for window in windows:
            started = time.perf_counter()
            out = prefill(tokens=window[None, :p], input_pos=np.arange(p, dtype=np.int32), **empty_kv)
            prefill_seconds.append(time.perf_counter() - started)
            window_logits = [out["logits"][0]]
            kv = {name: out[name] for name in kv_names}
            for pos in range(p, len(window)):
                started = time.perf_counter()
                out = decode(tokens=window[None, pos : pos + 1], input_pos=np.array([pos], np.int32), **kv)
                decode_seconds.append(time.perf_counter() - started)
                window_logits.append(out["logits"][0])
                kv = {name: out[name] for name in kv_names}
            all_logits.append(np.concatenate(window_logits))
    except (RuntimeError, ValueError) as error:
        raise RuntimeRejectedError(f"LiteRT failed to run {tflite}: {error}") from error
    return InterpreterRun(np.stack(all_logits), prefill_seconds, decode_seconds)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
    """exp of the mean next-token negative log-likelihood; the last position has no target."""
    log_probs = _log_softmax(logits[:, :-1])
    targets = windows[:, 1:]
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)
    return float(np.exp(nll.mean()))


@dataclass(frozen=True)
class Fidelity:
    perplexity: float
    perplexity_ratio: float  # vs the PyTorch float model
    mean_kl: float  # KL(float || candidate) of next-token distributions, nats
    top1_agreement: float  # fraction of positions whose most likely token matches float's


def compare(logits: np.ndarray, reference: np.ndarray, windows: np.ndarray) -> Fidelity:
    ppl, ref_ppl = perplexity(logits, windows), perplexity(reference, windows)
    log_p, log_q = _log_softmax(reference), _log_softmax(logits)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return Fidelity(
        perplexity=ppl,
        perplexity_ratio=ppl / ref_ppl,
        mean_kl=float(max(kl.mean(), 0.0)),
        top1_agreement=float((logits.argmax(-1) == reference.argmax(-1)).mean()),
    )


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
    top1_agreement: float
    prefill_ms: float
    decode_tokens_per_s: float
    eval_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def evaluate(candidate: TfliteModel, float_model: TfliteModel, reference: FloatReference,
             settings: ExportSettings, num_threads: int) -> Evaluation:
    windows, reference_logits = reference.load()
    run = run_interpreter(candidate.path, windows, settings, num_threads)
    fidelity = compare(run.logits, reference_logits, windows)
    return Evaluation(
        file_bytes=candidate.file_bytes,
        file_ratio=float_model.file_bytes / candidate.file_bytes,
        weight_bytes=candidate.weight_bytes,
        weight_ratio=float_model.weight_bytes / candidate.weight_bytes,
        perplexity=fidelity.perplexity,
        perplexity_ratio=fidelity.perplexity_ratio,
        mean_kl=fidelity.mean_kl,
        top1_agreement=fidelity.top1_agreement,
        prefill_ms=1000 * float(np.median(run.prefill_seconds)),
        decode_tokens_per_s=len(run.decode_seconds) / sum(run.decode_seconds),
        eval_tokens=int(windows.size),
    )
