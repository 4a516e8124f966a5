"""The asset graph's vocabulary, spelled once: every asset in graph order, with the job that materializes it, the
group the UI draws it in, whether `--convert-only` makes it, whether its step imports torch, which settings are
in its code version, and which memory estimate its step is admitted with.

Everything that lists assets derives from ``STAGES``: the jobs and asset groups (``definitions.py``), the
conversion's assets the rebuild plan selects (``staleness.py``), `--convert-only` and worker retirement
(``runs/``), the steps that hold no model (``defs/executor.py``), each step's memory estimate (``footprint.py``)
and code version (``versions.py``). Adding an asset means its own file in ``defs/`` and a line here.
"""

from __future__ import annotations

from dataclasses import dataclass

# The jobs: a Dagster run materializes one partition key, so the graph of a model runs as convert -> recipes ->
# one run per recipe -> reports.
CONVERT_JOB = "convert_checkpoint"  # per model
RESOLVE_JOB = "resolve_recipe"  # per recipe
QUANTIZE_JOB = "quantize_evaluate_publish"  # per (model, recipe)
REPORT_JOB = "report"  # per model
ALL_MODELS_REPORT_JOB = "report_all_models"  # unpartitioned
JOB_PARTITIONS = {
    CONVERT_JOB: "model",
    RESOLVE_JOB: "recipe",
    QUANTIZE_JOB: "model_recipe",
    REPORT_JOB: "model",
    ALL_MODELS_REPORT_JOB: None,
}

MODEL_PARTITION, RECIPE_PARTITION = "model", "recipe"  # the dynamic partitions' names
# The settings a code version can include (``versions.py`` reads their values), and the toolchains it can name.
EXPORTER, EXPORT, REFERENCE, CALIBRATION, EVALUATION = "exporter", "export", "reference", "calibration", "evaluation"
TASKS = "tasks"
CONVERSION_TOOLCHAIN, WHOLE_TOOLCHAIN = "conversion", "whole"  # toolchain.py: with or without LiteRT-LM


@dataclass(frozen=True)
class Stage:
    asset: str
    job: str
    group: str  # the UI's groups, in graph order: checkpoints, export, recipes, quantize, evaluate, publish
    # Its code version: bumped when what it makes changes for the same inputs; with the versions of the toolchain
    # that makes it and the settings that shape it (versions.py). None: Dagster's default (no staleness by code).
    code_version: str | None = None
    toolchain: str | None = None
    settings: tuple[str, ...] = ()
    conversion: bool = False  # made by `edge-quant run --convert-only`
    needs_torch: bool = False  # its step imports torch (and the model): its worker process exits after the run
    memory: str | None = None  # its estimate in footprint.py; None: the bare process, no model held
    # A step that records why when it could never fit, and lets its run go on: the run's estimate leaves it out.
    skipped_when_too_big: bool = False
    # The metadata key under which its materialization records its file in the work folder (what pruning keeps).
    work_file: str | None = None


_TORCH = dict(needs_torch=True)  # the step loads the checkpoint as a PyTorch model
_BY_CONVERSION = dict(toolchain=CONVERSION_TOOLCHAIN)  # made by litert-torch / ai-edge-quantizer / LiteRT
STAGES = (
    Stage("checkpoint", CONVERT_JOB, "checkpoints", "checkpoint-1", settings=(EXPORTER,), conversion=True, **_TORCH),
    Stage(
        "float_tflite",
        CONVERT_JOB,
        "export",
        "float_tflite-2",  # 2: litert-torch's lightweight conversion (other bytes, the same logits)
        **_BY_CONVERSION,
        settings=(EXPORT,),
        conversion=True,
        **_TORCH,
        memory="export",
        work_file="tflite",
    ),
    Stage(
        "float_reference",
        CONVERT_JOB,
        "export",
        "float_reference-3",
        **_BY_CONVERSION,
        settings=(REFERENCE,),
        **_TORCH,
        memory="float_reference",
        work_file="reference",
    ),
    Stage(
        "float_baseline",
        CONVERT_JOB,
        "export",
        "float_baseline-1",
        toolchain=WHOLE_TOOLCHAIN,
        settings=(TASKS, EXPORT, REFERENCE),  # the float file's shape, the prompts' text
        memory="float_baseline",
        skipped_when_too_big=True,
    ),
    Stage(
        "calibration",
        CONVERT_JOB,
        "export",
        "calibration-2",
        **_BY_CONVERSION,
        settings=(CALIBRATION, EXPORT),
        conversion=True,
        memory="calibration",
        work_file="statistics",
    ),
    Stage("quant_recipe", RESOLVE_JOB, "recipes", conversion=True),
    Stage(
        "resolved_recipe",
        QUANTIZE_JOB,
        "recipes",
        "resolved_recipe-1",
        **_BY_CONVERSION,
        conversion=True,
        memory="search",
    ),
    Stage(
        "quantized_tflite",
        QUANTIZE_JOB,
        "quantize",
        "quantized_tflite-1",
        **_BY_CONVERSION,
        conversion=True,
        memory="quantize",
        work_file="tflite",
    ),
    Stage(
        "evaluation",
        QUANTIZE_JOB,
        "evaluate",
        "evaluation-7",  # 7: the runtime's agreement compared as text; a generic-path export's proof in the metrics
        toolchain=WHOLE_TOOLCHAIN,
        settings=(EVALUATION,),
        memory="evaluation",
    ),
    Stage("published_artifact", QUANTIZE_JOB, "publish"),
    Stage("quantization_report", REPORT_JOB, "publish"),
    Stage("all_models_report", ALL_MODELS_REPORT_JOB, "publish"),
)
BY_ASSET = {stage.asset: stage for stage in STAGES}


def assets_of(job: str) -> tuple[str, ...]:
    return tuple(stage.asset for stage in STAGES if stage.job == job)


# The per-model assets the conversion job makes, in graph order (what the rebuild plan selects from).
MODEL_ASSETS = assets_of(CONVERT_JOB)
CONVERSION_ASSETS = tuple(stage.asset for stage in STAGES if stage.conversion)
# Steps that never hold a model: 196-250 MB measured (quant_recipe, published_artifact streams the file, the reports).
LIGHT_STEPS = tuple(stage.asset for stage in STAGES if stage.memory is None and not stage.needs_torch)
