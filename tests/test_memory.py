"""Admission by memory: the arithmetic, and the ledger shared by real processes on this machine."""

import multiprocessing
import time
from dataclasses import replace

import pytest

from edge_quant_pipeline.footprint import (
    RUNTIME_FILES,
    TORCH_PROCESS_MB,
    ModelSize,
    export_mb,
    input_hessian_bytes,
    step_mb,
    steps_mb,
)
from edge_quant_pipeline.memory import (
    MB,
    MachineMemory,
    MemoryLedger,
    NotEnoughMemoryError,
    PeakMemory,
    Reservation,
    admission,
    headroom_mb,
    machine_memory,
    rss_mb,
)
from edge_quant_pipeline.quantize.catalog import CalibrationNeed
from edge_quant_pipeline.quantize.recipes import BUILTIN_RECIPES
from edge_quant_pipeline.settings import EXPORT_HF

MACHINE = MachineMemory(total_mb=24_000, available_mb=20_000)  # headroom: 5% of the total, 1,200 MB


def holder(mb: float) -> Reservation:
    """A reservation held by this test process (whose RSS counts towards what it has taken already)."""
    import os

    return Reservation(os.getpid(), "", mb, "holder")


def test_a_step_fits_in_what_is_available_less_what_running_steps_may_still_add():
    grown = rss_mb()
    assert admission(10_000, [], MACHINE).admitted
    assert not admission(19_000, [], MACHINE).admitted  # 20,000 available, 1,200 kept free
    waits = admission(10_000, [holder(grown + 9_000)], MACHINE)  # the holder may still add 9,000
    assert not waits.admitted and waits.free_mb == pytest.approx(20_000 - 1_200 - 9_000, abs=1)
    assert waits.needs_mb <= waits.ever_mb  # it fits once the holder is done: wait, do not fail


def test_a_step_that_could_never_fit_fails_at_once_saying_what_it_needs(tmp_path):
    ledger = MemoryLedger(tmp_path / "ledger.json")
    needs = 4 * machine_memory().total_mb
    started = time.monotonic()
    with pytest.raises(NotEnoughMemoryError, match=r"export \[m\] needs about .* GB of memory .* at most .* GB"):
        with ledger.reserved(needs, "export [m]", on_wait=print):
            pass
    assert time.monotonic() - started < 1


def _hold(path, mb: float, seconds: float, held) -> None:
    from edge_quant_pipeline import memory

    memory.machine_memory = lambda: MACHINE  # the same machine as the test's, whatever else runs beside it
    with MemoryLedger(path).reserved(mb, "big step [other process]", on_wait=print):
        held.set()
        time.sleep(seconds)


def test_a_step_waits_while_another_process_holds_the_memory(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    # Both processes see one fixed machine (MemAvailable moves with the tests running beside this one). The
    # other process reserves all but 512 MB of what is free: a step of 4 GB must wait for it to finish.
    monkeypatch.setattr("edge_quant_pipeline.memory.machine_memory", lambda: MACHINE)
    big = MACHINE.available_mb - headroom_mb(MACHINE) - 512
    held = multiprocessing.get_context("spawn").Event()
    other = multiprocessing.get_context("spawn").Process(target=_hold, args=(path, big, 3.0, held))
    other.start()
    assert held.wait(60)
    monkeypatch.setattr("edge_quant_pipeline.memory.WAIT_POLL_SECONDS", 0.2)
    messages = []
    started = time.monotonic()
    with MemoryLedger(path).reserved(rss_mb() + 4096, "small step [this process]", on_wait=messages.append):
        waited = time.monotonic() - started
    other.join()
    assert waited > 1.0, "admitted while the other process held the memory"
    assert (
        messages[0].startswith("Waiting for 4.0 GB of memory (small step") and "big step [other process]" in messages[0]
    )
    assert f"; pid {other.pid}, " in messages[0] and "instance " in messages[0]  # who holds it, of which instance
    assert messages[-1].startswith("small step [this process]: admitted after ")  # the live view's wait ends


def test_reservations_of_dead_processes_are_dropped(tmp_path):
    path = tmp_path / "ledger.json"
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    path.write_text(f'[{{"pid": {dead.pid}, "started": "1", "mb": 1e9, "label": "gone"}}]')
    assert MemoryLedger(path).try_reserve(rss_mb() + 100, "step").admitted


SHAPES = {  # the real configs' sizes (edge_quant_pipeline.synthetic), float files as exported
    "smollm2-135m": ModelSize(134_515_008, 30, 49_152, 269_060_552, 540_453_760, 128),
    "qwen2.5-0.5b": ModelSize(494_032_768, 24, 151_936, 988_097_824, 1_977_895_968, 128),
    "llama3.2-1b": ModelSize(1_235_814_400, 16, 128_256, 2_471_628_800, 4 * 1_235_814_400, 128),
    "llama3.2-3b": ModelSize(3_212_749_824, 28, 128_256, 6_425_499_648, 12_851_945_472, 128),
    "qwen3-4b": ModelSize(4_022_468_096, 36, 151_936, 8_044_936_192, 16_089_872_384, 128),
    # Gemma 4 E2B as shipped: its language model's parameters (the towers not counted), 2.35B in its per-layer table
    "gemma4-e2b": ModelSize(
        4_628_569_379,
        35,
        262_144,
        10_208_852_910,
        9_121_166_064,
        128,
        exporter=EXPORT_HF,
        table_parameters=2_348_810_240,
    ),
}
LLAMA_1B_CONFIG = dict(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64, intermediate_size=8192
)
# Llama 3.2 1B in bfloat16, as the planner sees it before the export (input Hessians from config.json).
LLAMA_1B = ModelSize(
    1_235_814_400, 16, 128_256, 2_471_628_800, 4 * 1_235_814_400, 128, input_hessian_bytes(LLAMA_1B_CONFIG)
)
CONVERSION = ["checkpoint", "float_tflite", "float_reference", "calibration"]


def test_input_hessians_are_known_before_the_export_as_the_export_counts_them(demo_export, demo_checkpoint_dir):
    import json

    from edge_quant_pipeline.quantize.calibration import hessian_bytes
    from edge_quant_pipeline.shapes import ExportSettings

    hf_config = json.loads((demo_checkpoint_dir / "config.json").read_text())
    assert input_hessian_bytes(hf_config) == hessian_bytes(demo_export[1], ExportSettings())
    # 16 layers of 3 x 2048^2 + 8192^2 floats, and the LM head's 2048^2
    assert input_hessian_bytes(LLAMA_1B_CONFIG) == 4 * (16 * (3 * 2048**2 + 8192**2) + 2048**2)


def test_a_catalog_without_calibrated_recipes_costs_the_conversion_no_calibration():
    """The Llama 3.2 1B shape's conversion with the default recipes is its export and float reference, which a
    24 GB machine fits; with a static or GPTQ recipe in the catalog, calibration (the float file run with every
    intermediate kept, and for GPTQ the Hessians) is the largest step, and the planner sees it before the export."""
    assert step_mb("calibration", LLAMA_1B, calibration=CalibrationNeed.NONE) == TORCH_PROCESS_MB
    conversion = steps_mb(CONVERSION, LLAMA_1B, calibration=CalibrationNeed.NONE)
    assert conversion == max(export_mb(LLAMA_1B), step_mb("float_reference", LLAMA_1B)) < 20_000
    ranges = step_mb("calibration", LLAMA_1B, calibration=CalibrationNeed.RANGES)
    hessians = step_mb("calibration", LLAMA_1B, calibration=CalibrationNeed.HESSIANS)
    assert conversion < ranges < hessians == steps_mb(CONVERSION, LLAMA_1B)


def test_the_export_of_a_family_no_test_covers_is_planned_with_its_proof():
    """Its step then loads transformers' float32 model and runs the float file in the runtime (export_proof.py):
    at the Llama 3.2 1B shape the runtime's 1.6x the float file outweighs the export."""
    unproven = replace(LLAMA_1B, proven_family=False)
    assert export_mb(unproven) == TORCH_PROCESS_MB + RUNTIME_FILES * LLAMA_1B.float_tflite_bytes / MB
    assert export_mb(unproven) > export_mb(LLAMA_1B) and export_mb(unproven) >= step_mb("float_reference", LLAMA_1B)


# Peaks measured on this machine kind, MB (benchmarks/bench_scale.py: each step's process; for a recipe that
# dequantizes, the runtime alone, which is the larger part of its evaluation; the exports by
# benchmarks/bench_export.py, lightweight conversion, the exporting process alone; the Llama 3.2 3B shape's steps
# in `edge-quant run`, docs/real-sizes.md).
MEASURED = [
    ("smollm2-135m", "float_tflite", None, 2_630),
    ("smollm2-135m", "float_reference", None, 1_950),
    ("smollm2-135m", "quantized_tflite", "fp16", 1_900),
    ("smollm2-135m", "quantized_tflite", "dynamic_int8", 1_070),
    ("smollm2-135m", "evaluation", "float", 1_080),
    ("qwen2.5-0.5b", "float_tflite", None, 3_760),
    ("llama3.2-3b", "float_tflite", None, 15_870),
    ("llama3.2-3b", "float_reference", None, 15_830),
    ("llama3.2-3b", "quantized_tflite", "dynamic_int4_block32", 7_530),
    ("llama3.2-3b", "evaluation", "dynamic_int8", 14_070),
    ("llama3.2-3b", "evaluation", "dynamic_int4_block32", 14_060),
    ("llama3.2-1b", "float_reference", None, 6_880),
    ("llama3.2-1b", "evaluation", "dynamic_int8", 5_730),
    ("qwen3-4b", "float_tflite", None, 18_890),
    ("gemma4-e2b", "float_tflite", None, 14_770),
    ("gemma4-e2b", "float_reference", None, 14_140),
    ("gemma4-e2b", "quantized_tflite", "dynamic_int8", 5_090),
    ("gemma4-e2b", "quantized_tflite", "dynamic_int4_block32", 6_440),
    ("qwen2.5-0.5b", "float_reference", None, 3_980),
    ("qwen2.5-0.5b", "quantized_tflite", "fp16", 4_020),
    ("qwen2.5-0.5b", "quantized_tflite", "dynamic_int8", 1_360),
    ("qwen2.5-0.5b", "evaluation", "float", 2_910),
    ("qwen2.5-0.5b", "evaluation", "weight_only_int8", 7_950),
]


@pytest.mark.parametrize("shape, step, recipe, measured", MEASURED)
def test_estimates_are_above_the_measured_peaks_but_not_far(shape, step, recipe, measured):
    estimate = step_mb(step, SHAPES[shape], BUILTIN_RECIPES[recipe] if recipe else None)
    assert measured <= estimate <= 1.5 * measured


def test_a_measured_block_inside_another_keeps_the_outer_peak():
    """One kernel mark per process: the inner block's reset must not hide what the outer block saw before."""
    import numpy as np

    with PeakMemory() as outer:
        held = np.ones(400 * 2**20 // 8)  # 400 MB, touched, then given back
        del held
        with PeakMemory() as inner:
            pass
    assert outer.mb > inner.mb + 300
