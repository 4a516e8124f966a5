"""The words of the recipe language: schemes (how a layer's weights are stored and how it computes) and
algorithms (how the quantized values are chosen), and which of them ai-edge-quantizer accepts for which op.

A recipe field names a scheme, optionally refined by an algorithm: ``int4_dynamic_block32`` or
``int4_dynamic_block32+gptq``. Every weight a recipe quantizes is consumed by one of two ops, a
FULLY_CONNECTED layer (attention, feed-forward, LM head) or the EMBEDDING_LOOKUP, so whether a choice is
possible is a question per op, answered before any work by ai-edge-quantizer's own policy check
(``algorithm_manager.check_op_quantization_config``) plus the few refusals it only raises half way through a
quantization (``_refusal``); ``tests/test_schemes.py`` quantizes every combination for real and pins both.

This module imports ai-edge-quantizer only inside functions: recipes are parsed when the code location loads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cache


@enum.unique
class WeightType(enum.Enum):
    INT8 = 8
    INT4 = 4
    INT2 = 2
    FP16 = 16


@enum.unique
class Compute(enum.Enum):
    """What the layer computes in, as the file shows it (``weights.WeightTensor.compute``)."""

    FLOAT = "float"  # weights dequantized to float before use (weight-only, fp16)
    DYNAMIC = "integer"  # activations quantized at run time, integer kernels
    STATIC_A8 = "static a8"  # activations int8, with ranges calibrated ahead of time
    STATIC_A16 = "static a16"  # activations int16, likewise

    @property
    def activation_bits(self) -> int | None:
        return {Compute.STATIC_A8: 8, Compute.STATIC_A16: 16}.get(self)


@enum.unique
class Op(enum.Enum):
    """The two ops that hold a recipe's weights (ai-edge-quantizer's ``TFLOperationName`` values)."""

    FULLY_CONNECTED = "FULLY_CONNECTED"
    EMBEDDING_LOOKUP = "EMBEDDING_LOOKUP"


@dataclass(frozen=True)
class Scheme:
    weight: WeightType
    granularity: str  # ai-edge-quantizer's QuantGranularity name: CHANNELWISE, BLOCKWISE_32, ...; TENSORWISE: fp16
    compute: Compute

    @property
    def block_size(self) -> int | None:
        prefix = "BLOCKWISE_"
        return int(self.granularity[len(prefix) :]) if self.granularity.startswith(prefix) else None

    @property
    def is_float(self) -> bool:
        return self.weight is WeightType.FP16

    @property
    def stored_bits(self) -> float:
        """Bits a weight takes in the file: its own, and its share of its block's float32 scale."""
        return self.weight.value + (32 / self.block_size if self.block_size else 0)

    @property
    def is_static(self) -> bool:
        return self.compute.activation_bits is not None

    @property
    def words(self) -> str:
        """What it does, for a reader who does not know the scheme names (the model card)."""
        if self.is_float:
            return "float16 weights, computed in float"
        layout = f"in blocks of {self.block_size}" if self.block_size else "per output channel"
        compute = {
            Compute.FLOAT: "dequantized to float for compute (weight-only)",
            Compute.DYNAMIC: "integer compute, activations quantized at run time",
            Compute.STATIC_A8: "integer compute, int8 activations with calibrated ranges",
            Compute.STATIC_A16: "integer compute, int16 activations with calibrated ranges",
        }[self.compute]
        return f"int{self.weight.value} weights scaled {layout}, {compute}"

    @property
    def stored_as(self) -> tuple[str, str, str]:
        """(dtype, granularity, compute) as ``weights.py`` reads them back from the file."""
        dtype = "FLOAT16" if self.is_float else self.weight.name
        granularity = "none" if self.is_float else self.granularity.lower()
        return dtype, granularity, self.compute.value


def _int(bits: WeightType, granularity: str, compute: Compute) -> Scheme:
    return Scheme(bits, granularity, compute)


SCHEMES: dict[str, Scheme] = {
    "int8_dynamic": _int(WeightType.INT8, "CHANNELWISE", Compute.DYNAMIC),
    "int8_weight_only": _int(WeightType.INT8, "CHANNELWISE", Compute.FLOAT),
    "fp16": Scheme(WeightType.FP16, "TENSORWISE", Compute.FLOAT),
    **{
        f"int4_dynamic_block{size}": _int(WeightType.INT4, f"BLOCKWISE_{size}", Compute.DYNAMIC)
        for size in (32, 64, 128, 256)
    },
    # Beyond litert-torch's seven: the rest of what ai-edge-quantizer's policy and the runtime accept.
    "int4_dynamic": _int(WeightType.INT4, "CHANNELWISE", Compute.DYNAMIC),
    "int4_weight_only": _int(WeightType.INT4, "CHANNELWISE", Compute.FLOAT),
    "int2_dynamic": _int(WeightType.INT2, "CHANNELWISE", Compute.DYNAMIC),
    "int8_static_a8": _int(WeightType.INT8, "CHANNELWISE", Compute.STATIC_A8),
    "int8_static_a16": _int(WeightType.INT8, "CHANNELWISE", Compute.STATIC_A16),
    "int4_static_a8": _int(WeightType.INT4, "CHANNELWISE", Compute.STATIC_A8),
    "int4_static_a16": _int(WeightType.INT4, "CHANNELWISE", Compute.STATIC_A16),
}

# Names users may reach for, and why they are not schemes (checked on this toolchain by tests/test_schemes.py).
NOT_OFFERED = {
    **{
        f"int8_dynamic_block{size}": "ai-edge-quantizer 0.10's policy quantizes int8 weights per channel only"
        for size in (32, 64, 128, 256)
    },
    **{
        f"int4_weight_only_block{size}": "ai-edge-quantizer 0.10's policy has no blockwise weight-only scheme"
        for size in (32, 64, 128, 256)
    },
    **{
        f"int2_dynamic_block{size}": "ai-edge-quantizer writes it, but the LiteRT runtime (ai-edge-litert 2.3) "
        "cannot prepare a model with int2 blocks"
        for size in (32, 64, 128, 256)
    },
}

# Algorithm name in recipes -> ai-edge-quantizer's AlgorithmName value.
ALGORITHMS = {
    "min_max": "min_max_uniform_quantize",  # the default: scale from the weights' largest magnitude
    "gptq": "GPTQ",  # rounds column by column, correcting the error with the layer's input Hessian
    "hadamard": "DECOMPOSED_HADAMARD_ROTATION",  # rotates weights (and, at run time, inputs) before quantizing
    "octav": "OCTAV",  # clips outliers at the range that minimises the expected error
    "mse": "MSE",  # clips at the range that minimises the weights' mean squared error
}
DEFAULT_ALGORITHM = "min_max"
_FLOAT_CASTING = "float_casting"


class SchemeError(ValueError):
    """A scheme or algorithm name, or a combination, that cannot be used; the message says what is allowed."""


@dataclass(frozen=True)
class Quantization:
    """What one recipe field asks for: a scheme, and the algorithm that picks its quantized values."""

    scheme_name: str
    algorithm: str = DEFAULT_ALGORITHM

    @property
    def scheme(self) -> Scheme:
        return SCHEMES[self.scheme_name]

    @property
    def name(self) -> str:
        """As a recipe writes it; the default algorithm is not written."""
        return self.scheme_name if self.algorithm == DEFAULT_ALGORITHM else f"{self.scheme_name}+{self.algorithm}"

    @property
    def words(self) -> str:
        chosen = "" if self.algorithm == DEFAULT_ALGORITHM else f", values chosen by {self.algorithm}"
        return self.scheme.words + chosen

    @property
    def needs_calibration(self) -> bool:
        """Static activation ranges and GPTQ's Hessians come from running the float model on calibration text."""
        return self.scheme.is_static or self.algorithm == "gptq"

    @property
    def algorithm_key(self) -> str:
        return _FLOAT_CASTING if self.scheme.is_float else ALGORITHMS[self.algorithm]

    def op_config(self):
        """ai-edge-quantizer's ``OpQuantizationConfig`` for this choice."""
        from ai_edge_quantizer import qtyping

        scheme = self.scheme
        weights = qtyping.TensorQuantizationConfig(
            num_bits=scheme.weight.value,
            symmetric=True,
            granularity=qtyping.QuantGranularity[scheme.granularity],
            dtype=qtyping.TensorDataType.FLOAT if scheme.is_float else qtyping.TensorDataType.INT,
        )
        activations = None
        if scheme.is_static:  # int16 activations must be symmetric; int8 may be either, symmetric keeps one rule
            activations = qtyping.TensorQuantizationConfig(
                num_bits=scheme.compute.activation_bits,
                symmetric=True,
                granularity=qtyping.QuantGranularity.TENSORWISE,
                dtype=qtyping.TensorDataType.INT,
            )
        return qtyping.OpQuantizationConfig(
            activation_tensor_config=activations,
            weight_tensor_config=weights,
            compute_precision=qtyping.ComputePrecision.FLOAT
            if scheme.compute is Compute.FLOAT
            else qtyping.ComputePrecision.INTEGER,
            explicit_dequantize=scheme.compute is Compute.FLOAT,
        )


def parse_quantization(text: object) -> Quantization:
    """``scheme`` or ``scheme+algorithm``; a SchemeError names what is allowed."""
    if not isinstance(text, str):
        raise SchemeError(f"expected a scheme name, not {text!r}. Allowed schemes: {', '.join(SCHEMES)}.")
    scheme, _, algorithm = text.partition("+")
    if scheme not in SCHEMES:
        reason = f" ({NOT_OFFERED[scheme]})" if scheme in NOT_OFFERED else ""
        raise SchemeError(f"unknown scheme {scheme!r}{reason}. Allowed schemes: {', '.join(SCHEMES)}.")
    if algorithm and algorithm not in ALGORITHMS:
        raise SchemeError(
            f"unknown algorithm {algorithm!r} in {text!r}. Algorithms: {', '.join(ALGORITHMS)} "
            f"(written as scheme+algorithm; {DEFAULT_ALGORITHM} when none is given)."
        )
    if algorithm and SCHEMES[scheme].is_float:
        raise SchemeError(f"{scheme} casts weights to float16; it takes no algorithm (got {text!r}).")
    return Quantization(scheme, algorithm or DEFAULT_ALGORITHM)


def _refusal(quantization: Quantization, op: Op) -> str | None:
    """What ai-edge-quantizer 0.10 and the runtime refuse beyond its policy check (found half way through a
    quantization, or after it), each seen in tests/test_schemes.py."""
    scheme, algorithm = quantization.scheme, quantization.algorithm
    if algorithm == "mse" and (scheme.block_size or scheme.weight is WeightType.INT2):
        return "its MSE algorithm supports int8 and int4 per channel only"
    if algorithm == "hadamard" and scheme.compute is not Compute.DYNAMIC:
        # the rotated layer is written with dynamic integer compute whatever the scheme says
        return "its Hadamard rotation supports dynamic schemes only (int8_dynamic, int4_dynamic..., int2_dynamic)"
    return None


@cache
def refusal(quantization: Quantization, op: Op) -> str | None:
    """Why ai-edge-quantizer (or the runtime) would not apply ``quantization`` to ``op``'s weights; None if it
    would."""
    from ai_edge_quantizer import algorithm_manager, qtyping

    name = qtyping.TFLOperationName(op.value)
    if not algorithm_manager.is_op_registered(quantization.algorithm_key, name):
        return f"ai-edge-quantizer's {quantization.algorithm} algorithm does not handle {op.value}"
    try:
        algorithm_manager.check_op_quantization_config(quantization.algorithm_key, name, quantization.op_config())
    except ValueError:  # its message spells out the whole configuration object
        return f"ai-edge-quantizer's policy does not allow it for {op.value}"
    reason = _refusal(quantization, op)
    return f"ai-edge-quantizer refuses it: {reason}" if reason else None
