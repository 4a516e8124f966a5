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
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_quant_pipeline.runtime.session import Embedders, RuntimeRejectedError, prefill_inputs
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


def activation_names(tflite: Path, signature: str) -> set[str]:
    """Names of the operator outputs in ``signature``'s subgraph, read from the flatbuffer in place."""
    from ai_edge_litert import schema_py_generated as schema

    with tflite.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = schema.Model.GetRootAs(data, 0)
        signatures = [model.SignatureDefs(i) for i in range(model.SignatureDefsLength())]
        index = next(s.SubgraphIndex() for s in signatures if s.SignatureKey().decode() == signature)
        subgraph = model.Subgraphs(index)
        outputs = {
            int(t) for i in range(subgraph.OperatorsLength()) for t in subgraph.Operators(i).OutputsAsNumpy().tolist()
        }
        return {subgraph.Tensors(t).Name().decode() for t in outputs}


def _activations(tflite: Path, prompt: np.ndarray, signature: str, num_threads: int) -> Iterator:
    """((name, occurrence), float32 value) of each activation after one prefill of ``prompt`` from an empty KV
    cache; one interpreter, freed when the iteration ends. A few names repeat within a subgraph (a tied embedding's
    lookup and its LM head), so each is keyed by its name and how many tensors of that name came before it."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    names = activation_names(tflite, signature)
    try:
        # Every intermediate kept (no arena reuse) for one prefill, and no XNNPACK: its fused partitions would
        # leave the intermediates inside them undefined.
        interpreter = Interpreter(
            model_path=str(tflite),
            num_threads=num_threads,
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        runner = interpreter.get_signature_runner(signature)
        runner(**prefill_inputs(runner, prompt, Embedders(tflite, num_threads)))
    except (RuntimeError, ValueError) as error:
        raise RuntimeRejectedError(f"LiteRT could not run {tflite} to localise errors: {error}") from error
    subgraph = runner._subgraph_index  # as ai-edge-quantizer's validator finds a signature's tensors
    seen: dict[str, int] = {}
    for detail in interpreter.get_tensor_details(subgraph):
        name = detail["name"]
        if name in names and detail["dtype"] == np.float32 and np.all(detail["shape"]):
            seen[name] = seen.get(name, -1) + 1
            yield (name, seen[name]), interpreter.get_tensor(detail["index"], subgraph)


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
    signature = settings.prefill_signature
    reference = dict(_activations(float_tflite, prompt, signature, num_threads))
    errors = []
    for key, value in _activations(candidate, prompt, signature, num_threads):
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
