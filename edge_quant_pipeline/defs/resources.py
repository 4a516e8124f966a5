"""The one resource every asset reads its paths and settings from."""


from pathlib import Path

import dagster as dg

from edge_quant_pipeline.convert import ExportSettings
from edge_quant_pipeline.evaluate import EvalSettings
from edge_quant_pipeline.settings import DEFAULT_EVAL_TEXT


class PipelineConfig(dg.ConfigurableResource):
    """Where checkpoints, intermediate files and published artifacts live, and evaluation settings."""

    checkpoint_dir: str
    artifact_dir: str
    work_dir: str
    eval_text: str = str(DEFAULT_EVAL_TEXT)
    eval_max_tokens: int = EvalSettings.max_tokens
    interpreter_threads: int = EvalSettings.num_threads
    prefill_len: int = ExportSettings.prefill_len
    kv_cache_len: int = ExportSettings.kv_cache_len
    hotspots_top_n: int = 10

    @property
    def export_settings(self) -> ExportSettings:
        return ExportSettings(prefill_len=self.prefill_len, kv_cache_len=self.kv_cache_len)

    @property
    def eval_settings(self) -> EvalSettings:
        return EvalSettings(max_tokens=self.eval_max_tokens, num_threads=self.interpreter_threads)

    @property
    def checkpoint_dir_path(self) -> Path:
        return Path(self.checkpoint_dir)

    @property
    def store(self) -> Path:
        return Path(self.artifact_dir)

    def work_path(self, model_id: str, checkpoint_hash: str) -> Path:
        """Intermediate files of one checkpoint version; a new version gets a fresh folder."""
        path = Path(self.work_dir) / model_id / checkpoint_hash[:16]
        path.mkdir(parents=True, exist_ok=True)
        return path
