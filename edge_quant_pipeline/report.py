"""The per-model comparison table: every recipe, side by side, as pandas, Parquet and markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from edge_quant_pipeline.convert import write_atomically

# column -> (heading in the markdown table, number format)
DISPLAY_COLUMNS = {
    "recipe": ("recipe", ""),
    "status": ("status", ""),
    "file_mb": ("file MB", ".3f"),
    "file_ratio": ("file x", ".2f"),
    "weight_ratio": ("weights x", ".2f"),
    "perplexity": ("ppl", ".3f"),
    "perplexity_ratio": ("ppl / float", ".4f"),
    "mean_kl": ("mean KL", ".5f"),
    "p99_kl": ("p99 KL", ".4f"),
    "top1_agreement": ("top-1 agree", ".3f"),
    "logits_sqnr_db": ("logit SQNR dB", ".1f"),
    "generation_agreement": ("greedy agree", ".3f"),
    "prefill_ms": ("prefill ms", ".2f"),
    "decode_tokens_per_s": ("decode tok/s", ".0f"),
    "peak_rss_mb": ("RSS MB", ".0f"),
}


def report_row(recipe: str, manifest: dict[str, Any] | None, failure: dict[str, Any] | None) -> dict[str, Any]:
    """One row per recipe: metrics when published, the reason when not."""
    if manifest is not None:
        metrics = manifest["metrics"]
        return {
            "recipe": recipe,
            "status": "published",
            "version": manifest["version"],
            "artifact": manifest["artifact_path"],
            "file_mb": metrics["file_bytes"] / 1e6,
            **metrics,
            "error": None,
        }
    if failure is not None:
        return {"recipe": recipe, "status": f"failed ({failure['stage']})", "error": failure["error"]}
    return {"recipe": recipe, "status": "not run", "error": None}


def build_report(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in DISPLAY_COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    write_atomically(path, sink.getvalue().to_pybytes())
    return path


def to_markdown(frame: pd.DataFrame) -> str:
    table = frame[list(DISPLAY_COLUMNS)].rename(columns={k: v[0] for k, v in DISPLAY_COLUMNS.items()})
    table = table.astype(object).where(table.notna(), None)  # blank cells, not "nan"
    formats = tuple(fmt or "g" for _, fmt in DISPLAY_COLUMNS.values())
    text = table.to_markdown(index=False, floatfmt=formats, missingval="")
    failures = frame[frame["error"].notna()]
    notes = "".join(f"\n- **{row.recipe}**: {row.error}" for row in failures.itertuples())
    return text + ("\n\nNot published:" + notes if notes else "")
