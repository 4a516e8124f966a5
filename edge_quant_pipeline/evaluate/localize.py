"""Where a quantized model departs from the float one: per-tensor SNR over one prefill.

The float and the quantized ``.tflite`` run the same prompt through the prefill signature, and every
activation (an operator's output in the signature's subgraph) is compared by name, with ai-edge-quantizer's
definition of SNR (mean square of the float tensor over the mean squared difference). Error accumulates along
the network, so a tensor's SNR includes everything upstream of it; the place where SNR drops first is where a
recipe hurts most.

Memory stays bounded by one interpreter plus one prefill's activations: the interpreters run one after the
other, each mapping its file rather than holding a copy, and only activations are kept (ai-edge-quantizer's
``model_validator.compare_model`` copies both models into memory, runs both interpreters at once and reads
every tensor, weights included: +10 GB on a 0.5B model).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.runtime.inspect import InspectingPrefill
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.weights import component_of

_SNR_EPSILON = 1e-9  # ai-edge-quantizer's validation_utils.get_snr


@dataclass(frozen=True)
class TensorError:
    component: str
    block: int | None
    op: str  # the last segment of the tensor's module path, e.g. Linear_w2
    snr_db: float
    tensor: str


def short_op_name(tensor: str) -> str:
    return tensor.rsplit("/", 1)[-1].split(";")[0].rsplit(".", 1)[-1]


def _activations(tflite: Path, prompt: np.ndarray, settings: ExportSettings, num_threads: int) -> Iterator:
    """((name, occurrence), float32 value) of each activation after one prefill of ``prompt`` from an empty KV
    cache; one interpreter, freed when the iteration ends. A few names repeat within a subgraph (a tied embedding's
    lookup and its LM head), so each is keyed by its name and how many tensors of that name came before it."""
    prefill = InspectingPrefill(tflite, settings, num_threads, "to localise errors")
    for _ in prefill.run(prompt):
        pass
    seen: dict[str, int] = {}
    for detail in prefill.tensor_details():
        name = detail["name"]
        if name in prefill.operator_outputs and detail["dtype"] == np.float32 and np.all(detail["shape"]):
            seen[name] = seen.get(name, -1) + 1
            yield (name, seen[name]), prefill.tensor(detail["index"])


def _snr_db(candidate: np.ndarray, reference: np.ndarray) -> float | None:
    """None where SNR says nothing: an all-zero float tensor, or an identical one (which ai-edge-quantizer's
    epsilon would report as a large finite SNR, signal power / 1e-9)."""
    mask = np.isfinite(candidate) & np.isfinite(reference)
    candidate, reference = candidate[mask].astype(np.float64), reference[mask].astype(np.float64)
    if reference.size == 0:
        return None
    signal, noise = np.square(reference).mean(), np.square(candidate - reference).mean()
    if signal == 0 or noise == 0:
        return None
    return 10 * math.log10(signal / (noise + _SNR_EPSILON))


def tensor_errors(
    float_tflite: Path, candidate: Path, prompt: np.ndarray, settings: ExportSettings, num_threads: int
) -> list[TensorError]:
    """Every activation of the prefill signature with a nonzero float signal, worst first."""
    reference = dict(_activations(float_tflite, prompt, settings, num_threads))
    errors = []
    for key, value in _activations(candidate, prompt, settings, num_threads):
        if key not in reference or reference[key].shape != value.shape:
            continue
        snr_db, tensor = _snr_db(value, reference.pop(key)), key[0]
        if snr_db is not None:
            component, block = component_of(tensor)
            errors.append(TensorError(component, block, short_op_name(tensor), snr_db, tensor))
    return sorted(errors, key=lambda e: e.snr_db)


def layer_summary(errors: list[TensorError]) -> list[TensorError]:
    """The worst tensor of each (component, block), worst layer first."""
    worst: dict[tuple[str, int | None], TensorError] = {}
    for error in errors:  # already sorted worst first
        worst.setdefault((error.component, error.block), error)
    return list(worst.values())
