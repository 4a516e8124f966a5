"""A prefill whose every intermediate tensor can be read after each call: what calibration (layer statistics) and
error localisation (per-tensor SNR) look at.

It runs the legacy ``Interpreter`` with every intermediate kept (no arena reuse) and without XNNPACK, whose fused
partitions would leave the tensors inside them undefined; memory is one interpreter mapping its file plus one
call's activations. The signature's subgraph is read from the flatbuffer, where ai-edge-quantizer's validator
finds it too.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge_quant_pipeline.runtime.session import Embedders, RuntimeRejectedError, causal_mask
from edge_quant_pipeline.shapes import ExportSettings


def signature_operator_outputs(tflite: Path, signature: str) -> tuple[int, set[str]]:
    """``signature``'s subgraph index and the names of its operators' outputs, read from the flatbuffer in place."""
    from ai_edge_litert import schema_py_generated as schema

    with tflite.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        model = schema.Model.GetRootAs(data, 0)
        signatures = [model.SignatureDefs(i) for i in range(model.SignatureDefsLength())]
        index = next(s.SubgraphIndex() for s in signatures if s.SignatureKey().decode() == signature)
        subgraph = model.Subgraphs(index)
        outputs = {
            int(t) for i in range(subgraph.OperatorsLength()) for t in subgraph.Operators(i).OutputsAsNumpy().tolist()
        }
        return index, {subgraph.Tensors(t).Name().decode() for t in outputs}


class InspectingPrefill:
    """The prefill signature of one ``.tflite``, run window by window from an empty KV cache, each window chunk by
    chunk of ``prefill_len`` tokens; after each call every intermediate tensor of the signature is readable."""

    def __init__(self, tflite: Path, settings: ExportSettings, num_threads: int, purpose: str):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        self.tflite, self.prefill_len, self._purpose = tflite, settings.prefill_len, purpose
        self.subgraph, self.operator_outputs = signature_operator_outputs(tflite, settings.prefill_signature)
        with self._rejections(), warnings.catch_warnings():
            # The interpreter warns that keeping every tensor costs memory: one call's activations.
            warnings.simplefilter("ignore", UserWarning)
            self._interpreter = Interpreter(
                model_path=str(tflite),
                num_threads=num_threads,
                experimental_preserve_all_tensors=True,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            self._runner = self._interpreter.get_signature_runner(settings.prefill_signature)
            self._embedders = Embedders(tflite, num_threads)
        self._details = self._runner.get_input_details()

    @contextmanager
    def _rejections(self) -> Iterator[None]:
        """The runtime's errors as one ``RuntimeRejectedError`` naming the file and what it was run for."""
        try:
            yield
        except (RuntimeError, ValueError) as error:
            raise RuntimeRejectedError(f"LiteRT could not run {self.tflite} {self._purpose}: {error}") from error

    def run(self, window: np.ndarray) -> Iterator[int]:
        """Prefills ``window`` (a multiple of ``prefill_len`` tokens) from an empty KV cache; yields each call's
        first position once its tensors can be read."""
        details, p = self._details, self.prefill_len
        cache = {n: np.zeros(d["shape"], np.float32) for n, d in details.items() if n.startswith("kv_cache_")}
        for start in range(0, len(window), p):
            positions = np.arange(start, start + p, dtype=np.int32)
            with self._rejections():
                inputs = {**cache, **self._embedders.inputs(window[start : start + p]), "input_pos": positions}
                if "mask" in details:
                    inputs["mask"] = causal_mask(positions, int(details["mask"]["shape"][-1]))
                outputs = self._runner(**inputs)
            cache = {n: outputs[n] for n in cache}
            yield start

    def tensor_details(self) -> list[dict]:
        return self._interpreter.get_tensor_details(self.subgraph)

    def tensor(self, index: int) -> np.ndarray:
        return self._interpreter.get_tensor(index, self.subgraph)
