"""The resources every asset reads its paths and settings from: the pipeline's settings and the artifact store."""

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import dagster as dg
from upath import UPath

from edge_quant_pipeline import settings
from edge_quant_pipeline.checkpoints.digest import file_sha256
from edge_quant_pipeline.checkpoints.validate import Checkpoint
from edge_quant_pipeline.evaluate.tasks import DEMO_TASK_FILES, TaskRequest
from edge_quant_pipeline.quantize.catalog import CalibrationNeed, Catalog, load_catalog
from edge_quant_pipeline.settings import (
    AUTO,
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_CALIBRATION_TEXT,
    DEFAULT_EVAL_MAX_TOKENS,
    DEFAULT_EVAL_TEXT,
    DEFAULT_HOTSPOTS_TOP_N,
    DEFAULT_INTERPRETER_THREADS,
    DEFAULT_KEEP_VERSIONS,
    DEFAULT_TASK_LIMIT,
    DEFAULT_TASKS,
    DEFAULT_WORK_CACHE_GB,
)
from edge_quant_pipeline.shapes import ExportSettings
from edge_quant_pipeline.workstore import WorkStore


@functools.lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str | None:
    return file_sha256(path)


def text_sha256(path: Path) -> str | None:
    """A text file's sha256, hashed once per process for as long as its size and modification time hold."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def task_data_sha256(task: str) -> str | None:
    """What a task's scores depend on besides its name: its files, for a demo task, a folder (every file in it:
    keep a local task's data beside its YAML) or a YAML file; None for a registry task (lm-eval's own)."""
    path = Path(task)
    if task in DEMO_TASK_FILES:
        files = [DEMO_TASK_FILES[task]]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        return None
    return hashlib.sha256("".join(text_sha256(file) or "" for file in files).encode()).hexdigest()


class ArtifactStore(dg.ConfigurableResource):
    """Where published artifacts and reports live: a local folder or any fsspec URL
    (``s3://bucket/prefix``, ``gs://...``, ``memory://...``) whose filesystem package is installed."""

    url: str
    # Versions of each (model, recipe) kept, newest first, besides those latest.json and champion.json name; 0: all.
    keep_versions: int = DEFAULT_KEEP_VERSIONS

    @property
    def root(self) -> UPath:
        # Outside a run (the CLI's rebuild plan, tests) an EnvVar field still holds the variable itself.
        url = self.url.get_value() if isinstance(self.url, dg.EnvVar) else self.url
        path = UPath(url)
        if path.protocol == "":  # a relative local folder is fixed once, so every asset and the UI name one place
            return path.expanduser().absolute()
        # Other processes publish into the store: a listing cached by this one would hide their versions.
        return UPath(url, use_listings_cache=False)


class ExportConfig(dg.Config):
    """What shapes the float export, and so every model made from it."""

    prefill_len: int = ExportSettings.prefill_len
    kv_cache_len: int = ExportSettings.kv_cache_len
    # Which litert-torch exporter makes the float .tflite (export/exporters.py): auto, generative_api or export_hf.
    exporter: str = AUTO

    @property
    def settings(self) -> ExportSettings:
        return ExportSettings(prefill_len=self.prefill_len, kv_cache_len=self.kv_cache_len)


class EvaluationConfig(dg.Config):
    """What every evaluation scores and reports, besides the two models."""

    text: str = str(DEFAULT_EVAL_TEXT)
    max_tokens: int = DEFAULT_EVAL_MAX_TOKENS
    # Per-tensor SNR of one prefill against the float file (error_hotspots): the memory of one runtime without
    # XNNPACK, about the float file's size, and a few seconds for a 0.5B model.
    localize_errors: bool = True
    hotspots_top_n: int = DEFAULT_HOTSPOTS_TOP_N
    # lm-eval tasks each bundle answers in LiteRT-LM (evaluate/tasks.py), at most task_limit samples each (0: all).
    tasks: list[str] = list(DEFAULT_TASKS)
    task_limit: int = DEFAULT_TASK_LIMIT


class CalibrationConfig(dg.Config):
    """Static activation ranges and GPTQ Hessians (quantize/calibration.py): ``samples`` windows of kv_cache_len
    tokens of ``text``, run through the float .tflite once per checkpoint for every recipe that needs them."""

    text: str = str(DEFAULT_CALIBRATION_TEXT)
    samples: int = DEFAULT_CALIBRATION_SAMPLES


class PipelineConfig(dg.ConfigurableResource):
    """Where checkpoints, intermediate files and published artifacts live, and what shapes the export, the
    calibration and every evaluation."""

    checkpoint_dir: str
    artifact_store: ArtifactStore
    work_dir: str
    # Where intermediates cross between steps that share no disk (workstore.py): an fsspec URL, or "" for none.
    work_store: str = ""
    work_cache_gb: float = DEFAULT_WORK_CACHE_GB
    export: ExportConfig = ExportConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    # Every LiteRT interpreter's threads: evaluation, calibration and the quality-budget search.
    interpreter_threads: int = DEFAULT_INTERPRETER_THREADS
    # User recipes, merged with the built-in ones (none there: the built-in ones alone); read when used.
    recipes_file: str = "recipes.yaml"

    def recipe_catalog(self) -> Catalog:
        return load_catalog(Path(self.recipes_file))

    @property
    def calibration_need(self) -> CalibrationNeed:
        """What each checkpoint's calibration computes, for the catalog's recipes as the file is now."""
        return self.recipe_catalog().calibration_need

    @property
    def export_settings(self) -> ExportSettings:
        return self.export.settings

    def evaluation_settings(self) -> dict[str, Any]:
        """Besides the two models, what an evaluation's metrics depend on (the eval text by its sha256)."""
        evaluation = self.evaluation
        return {
            "eval_text_sha256": text_sha256(Path(evaluation.text)),
            "eval_max_tokens": evaluation.max_tokens,
            "interpreter_threads": self.interpreter_threads,
            "localize_errors": evaluation.localize_errors,
            "hotspots_top_n": evaluation.hotspots_top_n,
            "tasks": {task: task_data_sha256(task) for task in evaluation.tasks},
            "task_limit": evaluation.task_limit,
        }

    def task_request(self) -> TaskRequest:
        """The tasks each bundle answers in LiteRT-LM, with as many threads as each interpreter the evaluation runs."""
        evaluation = self.evaluation
        return TaskRequest(tuple(evaluation.tasks), evaluation.task_limit, self.interpreter_threads)

    def calibration_settings(self) -> dict[str, Any]:
        """What the calibration statistics depend on besides the model (the text by its sha256)."""
        return {
            "calibration_text_sha256": text_sha256(Path(self.calibration.text)),
            "calibration_samples": self.calibration.samples,
        }

    @property
    def checkpoint_dir_path(self) -> Path:
        return Path(self.checkpoint_dir)

    @property
    def store(self) -> UPath:
        return self.artifact_store.root

    @property
    def work(self) -> WorkStore:
        """This process's work folder, and the store its intermediates cross through when there is one."""
        remote = UPath(self.work_store, use_listings_cache=False) if self.work_store else None
        return WorkStore(Path(self.work_dir), remote, int(self.work_cache_gb * 1e9))

    def float_reference_path(self, checkpoint: Checkpoint, eval_text_sha256: str | None = None) -> Path:
        """Where the float reference of this eval text and token budget is kept."""
        sha256 = eval_text_sha256 or text_sha256(Path(self.evaluation.text))
        return self.work_path(checkpoint) / f"float_reference-{sha256[:12]}-{self.evaluation.max_tokens}"

    def calibration_path(self, checkpoint: Checkpoint) -> Path:
        """Where the calibration statistics of this calibration text and sample count are kept."""
        sha256 = text_sha256(Path(self.calibration.text))
        return self.work_path(checkpoint) / f"calibration-{sha256[:12]}-{self.calibration.samples}"

    def work_path(self, checkpoint: Checkpoint) -> Path:
        """Intermediate files of one checkpoint version, exporter and export shape; a change of any of them gets
        a fresh folder, so files made for other settings are never read nor overwritten."""
        export = self.export_settings
        path = (
            Path(self.work_dir)
            / checkpoint.model_id
            / f"{checkpoint.work_key}-p{export.prefill_len}-kv{export.kv_cache_len}"
        )
        path.mkdir(parents=True, exist_ok=True)
        return path


def artifact_store_from_env() -> ArtifactStore:
    # An EnvVar shows in the UI which variable sets the store; Dagster refuses one that is unset.
    keep = settings.keep_versions()
    if os.environ.get(settings.ARTIFACT_DIR_VARIABLE):
        return ArtifactStore(url=dg.EnvVar(settings.ARTIFACT_DIR_VARIABLE), keep_versions=keep)
    return ArtifactStore(url=settings.DEFAULT_ARTIFACT_DIR, keep_versions=keep)


def pipeline_config_from_env() -> PipelineConfig:
    return PipelineConfig(
        checkpoint_dir=str(settings.checkpoint_dir()),
        artifact_store=artifact_store_from_env(),
        work_dir=str(settings.work_dir()),
        work_store=settings.work_store() or "",
        work_cache_gb=settings.work_cache_gb(),
        export=ExportConfig(
            prefill_len=settings.prefill_len(), kv_cache_len=settings.kv_cache_len(), exporter=settings.exporter()
        ),
        evaluation=EvaluationConfig(
            text=str(settings.eval_text()),
            max_tokens=settings.eval_max_tokens(),
            localize_errors=settings.localize_errors(),
            hotspots_top_n=settings.hotspots_top_n(),
            tasks=settings.tasks(),
            task_limit=settings.task_limit(),
        ),
        calibration=CalibrationConfig(text=str(settings.calibration_text()), samples=settings.calibration_samples()),
        interpreter_threads=settings.interpreter_threads(),
        recipes_file=str(settings.recipes_file().absolute()),
    )
