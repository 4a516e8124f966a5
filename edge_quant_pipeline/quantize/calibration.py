"""Calibration statistics of one checkpoint: computed once from the float ``.tflite``, shared by every recipe that
needs them (static activation ranges, GPTQ).

What is computed, for every fully-connected layer with constant weights, over ``samples`` windows of
``kv_cache_len`` tokens of the calibration text, each run chunk by chunk through the prefill signature with the
KV cache carried, exactly as evaluation runs the eval text:

- the min and max of its input and of its output over all calls, as ai-edge-quantizer's ``qsv_utils.min_max_update``
  merges them. Not its calibrator's default, a moving average of each call's extremes, which clips: static int8
  with int16 activations added a mean KL of 0.0057 with those ranges on the SmolLM2-135M shape, 0.00017 with these
  (int8 activations: 0.0056 and 0.0005), about dynamic int8's 0.0002;
- its input's Hessian as ai-edge-quantizer's GPTQ defines it, 2 X^T X / n averaged over calls weighted by
  their n (``gptq.calibrate`` and ``qsv_utils.gptq_and_moving_average_update``), accumulated in place.

The decode signature runs the same layers one token at a time; its layers get the statistics of the prefill
layer that shares their weight buffer. The statistics are then handed to ai-edge-quantizer keyed by the tensor
names of both signatures (``quantizer_calibration``).

We run the float model ourselves rather than through ai-edge-quantizer's ``Calibrator``, which after every call
copies every tensor of the model, weights included, and for GPTQ also forms the Hessian of every layer's
*output*: vocabulary x vocabulary for the LM head, 92 GB for a 151,936-token vocabulary. Here memory holds the
float file (mapped), one prefill's activations and the input Hessians (4 x input size^2 bytes each).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_quant_pipeline.atomic import atomic_path
from edge_quant_pipeline.runtime.inspect import InspectingPrefill
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.workstore import SharedFiles

STATS_FILE, LAYERS_FILE = "stats.npz", "layers.json"


class CalibrationTextError(ValueError):
    """The calibration text cannot give the samples asked for; the message names the file and the fix."""


class CalibrationMissingError(RuntimeError):
    """A recipe needs statistics its checkpoint's calibration did not compute (no recipe of the catalog needed them
    when it ran); the message names the fix."""


@dataclass(frozen=True)
class Layer:
    """A fully-connected layer of one signature: its weight buffer and its activation tensors."""

    subgraph: int
    weight_buffer: int
    input_index: int
    input_name: str
    input_shape: tuple[int, ...]
    output_index: int
    output_name: str
    output_shape: tuple[int, ...]


def fully_connected_layers(tflite: Path) -> dict[str, list[Layer]]:
    """By signature, the FULLY_CONNECTED ops of its subgraph whose weights are constants."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    with tflite.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = schema.Model.GetRootAs(data, 0)
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        fully_connected = {
            i
            for i, c in enumerate(codes)
            if names[max(c.BuiltinCode(), c.DeprecatedBuiltinCode())] == "FULLY_CONNECTED"
        }
        signatures = [model.SignatureDefs(i) for i in range(model.SignatureDefsLength())]
        layers: dict[str, list[Layer]] = {}
        for signature in signatures:
            s, key = signature.SubgraphIndex(), signature.SignatureKey().decode()
            subgraph = model.Subgraphs(s)
            layers[key] = []
            for i in range(subgraph.OperatorsLength()):
                op = subgraph.Operators(i)
                if op.OpcodeIndex() not in fully_connected:
                    continue
                weight = subgraph.Tensors(op.Inputs(1))
                buffer = model.Buffers(weight.Buffer())
                if not (buffer.DataLength() or buffer.Size()):  # activations on both sides: not a weight layer
                    continue
                source, target = subgraph.Tensors(op.Inputs(0)), subgraph.Tensors(op.Outputs(0))
                layers[key].append(
                    Layer(
                        subgraph=s,
                        weight_buffer=weight.Buffer(),
                        input_index=int(op.Inputs(0)),
                        input_name=source.Name().decode(),
                        input_shape=tuple(int(d) for d in source.ShapeAsNumpy()),
                        output_index=int(op.Outputs(0)),
                        output_name=target.Name().decode(),
                        output_shape=tuple(int(d) for d in target.ShapeAsNumpy()),
                    )
                )
    return layers


def hessian_bytes(tflite: Path, settings: ExportSettings) -> int:
    """What the input Hessians of the prefill signature's layers take, float32 (layers sharing an input share it)."""
    inputs = {
        layer.input_name: layer.input_shape[-1] for layer in fully_connected_layers(tflite)[settings.prefill_signature]
    }
    return sum(4 * dim * dim for dim in inputs.values())


def calibration_windows(tokens: np.ndarray, settings: ExportSettings, samples: int, text: Path) -> np.ndarray:
    """``samples`` windows of ``kv_cache_len`` tokens, each a whole number of prefill chunks."""
    window = settings.kv_cache_len // settings.prefill_len * settings.prefill_len
    if len(tokens) < samples * window:
        raise CalibrationTextError(
            f"{text}: {len(tokens)} tokens with this checkpoint's tokenizer; calibration_samples={samples} needs "
            f"{samples * window} ({samples} windows of {window}). Use a longer text (EDGE_QUANT_CALIBRATION_TEXT) "
            "or fewer samples."
        )
    return tokens[: samples * window].reshape(samples, window)


class _Statistics:
    """Running statistics of each activation, keyed by its prefill tensor name."""

    def __init__(self, hessian_inputs: set[str]):
        self.hessian_inputs = hessian_inputs
        self.minimum: dict[str, np.ndarray] = {}
        self.maximum: dict[str, np.ndarray] = {}
        self.gram: dict[str, np.ndarray] = {}  # sum over calls of X^T X
        self.rows: dict[str, int] = {}  # sum over calls of n (the tensor's first dimension, as GPTQ counts)

    def add(self, name: str, value: np.ndarray) -> None:
        from ai_edge_quantizer.algorithms.uniform_quantize.common_quantize import get_activation_min_max

        found = get_activation_min_max(value)
        if name in self.minimum:
            self.minimum[name] = np.minimum(self.minimum[name], found["min"])
            self.maximum[name] = np.maximum(self.maximum[name], found["max"])
        else:
            self.minimum[name], self.maximum[name] = found["min"], found["max"]
        if name in self.hessian_inputs:
            x = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
            if name in self.gram:
                self.gram[name] += x.T @ x
            else:
                self.gram[name] = x.T @ x
            self.rows[name] = self.rows.get(name, 0) + (value.shape[0] if value.ndim else 1)

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for i, name in enumerate(self.minimum):
            arrays[f"{i}.min"], arrays[f"{i}.max"] = self.minimum[name], self.maximum[name]
            if name in self.gram:
                arrays[f"{i}.hessian"] = 2.0 * self.gram[name] / self.rows[name]
                arrays[f"{i}.num_samples"] = np.array(self.rows[name])
        return arrays


@dataclass(frozen=True)
class CalibrationStats:
    """The statistics folder of one checkpoint, calibration text and sample count."""

    path: Path
    samples: int
    tokens: int
    shared: SharedFiles | None = None  # where the next step finds it, when steps share no disk (workstore.py)

    def layers(self) -> list[dict[str, Any]]:
        return json.loads((self.path / LAYERS_FILE).read_text())["layers"]

    @property
    def computed(self) -> bool:
        """False when no recipe of the catalog needed statistics: nothing ran, nothing is stored."""
        return self.samples > 0

    @property
    def size_bytes(self) -> int:
        """What the statistics take in memory once loaded: about their file (stored uncompressed)."""
        return (self.path / STATS_FILE).stat().st_size if self.computed else 0


def calibrate(
    float_tflite: Path,
    tokens: np.ndarray,
    settings: ExportSettings,
    samples: int,
    text: Path,
    num_threads: int,
    output: Path,
    hessians: bool = True,
) -> CalibrationStats:
    """Run the float model over the calibration windows and store each layer's statistics in ``output``: ranges,
    and with ``hessians`` (GPTQ) each layer input's Hessian."""
    windows = calibration_windows(tokens, settings, samples, text)
    layers = fully_connected_layers(float_tflite)[settings.prefill_signature]
    statistics = _Statistics({layer.input_name for layer in layers} if hessians else set())
    # Once per call each: layers that share an input (gate and up projections) share its statistics.
    tensors = {
        **{layer.input_name: layer.input_index for layer in layers},
        **{layer.output_name: layer.output_index for layer in layers},
    }
    prefill = InspectingPrefill(float_tflite, settings, num_threads, "for calibration")
    for window in windows:
        for _ in prefill.run(window):
            for name, index in tensors.items():
                statistics.add(name, prefill.tensor(index))
    output.mkdir(parents=True, exist_ok=True)
    names = list(statistics.minimum)
    with atomic_path(output / STATS_FILE) as partial:
        np.savez(partial, **statistics.arrays())
    record = {
        "samples": samples,
        "tokens": int(windows.size),
        "layers": [
            {
                "weight_buffer": layer.weight_buffer,
                "input": names.index(layer.input_name),
                "output": names.index(layer.output_name),
            }
            for layer in layers
        ],
    }
    with atomic_path(output / LAYERS_FILE) as partial:
        partial.write_text(json.dumps(record))
    return CalibrationStats(output, samples, int(windows.size))


def quantizer_calibration(
    stats: CalibrationStats, float_tflite: Path, hessians: bool
) -> dict[str, dict[str, np.ndarray]]:
    """ai-edge-quantizer's calibration result ({tensor name: QSV}) for every fully-connected layer of every
    signature, from the prefill layer with the same weights; with the input Hessians when ``hessians`` (GPTQ)."""
    fix = "the catalog's recipes change what calibration computes: materialize this checkpoint's `calibration` again"
    if not stats.computed:
        raise CalibrationMissingError(f"{stats.path}: no calibration statistics were computed; {fix}.")
    by_buffer = {layer["weight_buffer"]: layer for layer in stats.layers()}
    result: dict[str, dict[str, np.ndarray]] = {}
    with np.load(stats.path / STATS_FILE) as stored:
        if hessians and not any(key.endswith(".hessian") for key in stored.files):
            raise CalibrationMissingError(f"{stats.path}: computed without the Hessians GPTQ needs; {fix}.")

        def qsv(index: int, shape: tuple[int, ...], with_hessian: bool) -> dict[str, np.ndarray]:
            ranges = {key: stored[f"{index}.{key}"].reshape((1,) * len(shape)) for key in ("min", "max")}
            if with_hessian and f"{index}.hessian" in stored:
                return {**ranges, "hessian": stored[f"{index}.hessian"], "num_samples": stored[f"{index}.num_samples"]}
            return ranges

        for layers in fully_connected_layers(float_tflite).values():
            for layer in layers:
                source = by_buffer.get(layer.weight_buffer)
                if source is None:
                    continue
                result.setdefault(layer.input_name, qsv(source["input"], layer.input_shape, hessians))
                result.setdefault(layer.output_name, qsv(source["output"], layer.output_shape, False))
    return result
