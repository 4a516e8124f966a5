"""The comparison tables: every recipe side by side, per model and across models, as pandas,
Parquet, markdown and a size-vs-quality scatter plot."""

from __future__ import annotations

import base64
import io
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from edge_quant_pipeline.publish.objects import read_whole, write_atomically
from edge_quant_pipeline.publish.store import ChampionUpdate, version_number

REPORT_FILE = "report.parquet"
PLOT_FILE = "report.png"
SEARCH_PLOT_FILE = "search-{recipe}.png"

# column -> (heading in the markdown table, number format)
DISPLAY_COLUMNS = {
    "recipe": ("recipe", ""),
    "status": ("status", ""),
    "champion": ("champion", ""),
    "number": ("#", ".0f"),
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
    # the bundle in LiteRT-LM itself: the runtime's own measurements
    "litert_lm_time_to_first_token_ms": ("LiteRT-LM TTFT ms", ".1f"),
    "litert_lm_prefill_tokens_per_s": ("LiteRT-LM prefill tok/s", ".0f"),
    "litert_lm_decode_tokens_per_s": ("LiteRT-LM decode tok/s", ".0f"),
}
# What `edge-quant run` prints: size, quality, speed on a phone's runtime, in about 120 columns (the champion on
# a line of its own); the report (Parquet, UI) has every column.
TERMINAL_COLUMNS = ("recipe", "status", "file_mb", "perplexity_ratio", "mean_kl", "litert_lm_decode_tokens_per_s")
# The manifest's `delta` (this version minus the previous one), one column per metric.
DELTA_COLUMNS = {
    "recipe": ("recipe", ""),
    "number": ("#", ".0f"),
    "previous_version": ("previous version", ""),
    "delta_file_bytes": ("Δ file bytes", "+,.0f"),
    "delta_perplexity_ratio": ("Δ ppl / float", "+.4f"),
    "delta_mean_kl": ("Δ mean KL", "+.5f"),
    "delta_top1_agreement": ("Δ top-1 agree", "+.3f"),
    "delta_decode_tokens_per_s": ("Δ decode tok/s", "+.0f"),
}


def report_row(
    recipe: str, manifest: dict[str, Any] | None, failure: dict[str, Any] | None, refusal: str | None = None
) -> dict[str, Any]:
    """One row per recipe: metrics and the change since the previous version when published, the reason when not
    (``refusal``: why it never ran, more memory than this machine has)."""
    if manifest is not None:
        metrics = manifest["metrics"]
        return {
            "recipe": recipe,
            "status": "published",
            "version": manifest["version"],
            "number": version_number(manifest),
            "previous_version": manifest.get("previous_version"),
            "artifact": manifest["artifact_path"],
            "file_mb": metrics["file_bytes"] / 1e6,
            **metrics,
            **{f"delta_{name}": value for name, value in (manifest.get("delta") or {}).items()},
            "search": search_summary(manifest["search"]) if manifest.get("search") else None,
            "error": None,
        }
    if failure is not None:
        return {"recipe": recipe, "status": f"failed ({failure['stage']})", "error": failure["error"]}
    if refusal is not None:
        return {"recipe": recipe, "status": "refused (memory)", "error": f"not run: {refusal}"}
    return {"recipe": recipe, "status": "not run", "error": None}


def build_report(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows as a table, the champion (the smallest published file) marked."""
    frame = pd.DataFrame(rows)
    for column in [*DISPLAY_COLUMNS, *DELTA_COLUMNS, "file_bytes", "version", "artifact", "search", "error"]:
        if column not in frame:
            frame[column] = None
    sizes = pd.to_numeric(frame["file_bytes"].where(frame["status"] == "published"))
    frame["champion"] = frame.index == sizes.idxmin() if sizes.notna().any() else False
    return frame


def champion_of(frame: pd.DataFrame) -> dict[str, Any] | None:
    """The pointer to the champion row (None when no recipe published)."""
    rows = frame[frame["champion"]]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return {
        "recipe": row["recipe"],
        "version": row["version"],
        "number": int(row["number"]),
        "file_bytes": int(row["file_bytes"]),
        "artifact_path": row["artifact"],
    }


def champion_note(update: ChampionUpdate) -> str:
    def name(pointer: dict[str, Any]) -> str:
        return f"{pointer['recipe']} #{pointer.get('number', 0)} ({pointer['version']})"

    if update.current is None:
        note = "**Champion:** none, no recipe of this checkpoint is published"
        return note + (f"; until now {name(update.previous)}." if update.previous else ".")
    note = f"**Champion:** {name(update.current)}, {update.current['file_bytes'] / 1e6:.3f} MB"
    if not update.changed:
        return note + ", unchanged."
    return note + (f", changed from {name(update.previous)}." if update.previous else ", the first one.")


def write_parquet(frame: pd.DataFrame, path: UPath) -> UPath:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    write_atomically(path, sink.getvalue().to_pybytes())
    return path


def read_parquet(path: UPath) -> pd.DataFrame | None:
    try:
        return pq.read_table(pa.BufferReader(read_whole(path))).to_pandas()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _with_errors(frame: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """Each metric that has a standard error (a ``<metric>_error`` column) as one cell, ``value ± error``."""
    frame = frame.copy()
    for column, (_, fmt) in columns.items():
        error = f"{column}_error"
        if fmt and error in frame:
            frame[column] = [
                f"{value:{fmt}} ± {spread:{fmt}}" if pd.notna(value) and pd.notna(spread) else value
                for value, spread in zip(frame[column], frame[error], strict=True)
            ]
    return frame


def _table(frame: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> str:
    table = _with_errors(frame, columns)[list(columns)].rename(columns={k: v[0] for k, v in columns.items()})
    table = table.astype(object).where(table.notna(), None)  # blank cells, not "nan"
    formats = tuple(fmt or "g" for _, fmt in columns.values())
    return table.to_markdown(index=False, floatfmt=formats, missingval="")


def to_markdown(frame: pd.DataFrame, only: tuple[str, ...] | None = None) -> str:
    """The table (with a model column across models; of the columns ``only``, if given), what changed since each
    previous version, failures."""
    shown = {k: v for k, v in DISPLAY_COLUMNS.items() if only is None or k in only}
    columns = {"model": ("model", ""), **shown} if "model" in frame else shown
    text = _table(frame.assign(champion=frame["champion"].map({True: "✓", False: ""})), columns)
    changed = frame[frame["previous_version"].notna()]
    if not changed.empty:
        delta_columns = {"model": ("model", ""), **DELTA_COLUMNS} if "model" in frame else DELTA_COLUMNS
        text += "\n\nSince the previous version:\n\n" + _table(changed, delta_columns)
    tasks = task_table(frame)
    text += (
        "\n\nTasks in LiteRT-LM (score ± standard error, change from the float model's in points):\n\n" + tasks
        if tasks
        else ""
    )
    searched = "".join(f"\n- **{row.recipe}**: {row.search}" for row in frame[frame["search"].notna()].itertuples())
    text += "\n\nResolved by search:" + searched if searched else ""
    failures = frame[frame["error"].notna()]
    notes = "".join(f"\n- **{row.recipe}**: {row.error}" for row in failures.itertuples())
    return text + ("\n\nNot published:" + notes if notes else "")


def task_table(frame: pd.DataFrame) -> str:
    """Each task's score per published recipe (a ``task_<task>_<metric>`` column, its error beside it) and its
    change in points from the float model's score in the same runtime (``float_task_...``, recorded with each
    recipe's evaluation), the float model's first; "" without task scores."""
    scores = [c for c in frame if c.startswith("task_") and not c.endswith("_error") and frame[c].notna().any()]
    if not scores:
        return ""
    published = [(row.get("model", ""), row) for _, row in frame[frame["status"] == "published"].iterrows()]

    def cell(row: pd.Series, column: str, reference: str | None) -> str:
        value, error = row.get(column), row.get(f"{column}_error")
        if value is None or pd.isna(value):
            return ""
        base = row.get(reference) if reference else None
        change = f" ({(value - base) * 100:+.1f})" if base is not None and pd.notna(base) else ""
        return f"{value:.3f} ± {error:.3f}{change}"

    def cells(row: pd.Series, prefix: str, compare: bool) -> dict[str, str]:
        return {c.removeprefix("task_"): cell(row, prefix + c, f"float_{c}" if compare else None) for c in scores}

    def named(model: str, recipe: str) -> dict[str, str]:
        return {"model": model, "recipe": recipe} if "model" in frame else {"recipe": recipe}

    # Every recipe's evaluation recorded the float model's scores it was gated against: one row per model.
    floats = {model: cells(row, "float_", False) for model, row in published}
    rows = [{**named(model, "(float model)"), **row} for model, row in floats.items() if any(row.values())]
    rows += [{**named(model, row["recipe"]), **cells(row, "", True)} for model, row in published]
    return pd.DataFrame(rows).to_markdown(index=False)


def size_quality_png(frame: pd.DataFrame) -> bytes:
    """File MB against perplexity / float, one labelled point per published recipe (a colour per model)."""
    # Imported here: matplotlib costs 0.2 s, paid by every code-location load and every run otherwise.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # Agg: renders without a display
    axes = figure.subplots()
    published = frame[frame["status"] == "published"]
    groups = published.groupby("model") if "model" in published else [(None, published)]
    for model, rows in groups:
        axes.scatter(rows["file_mb"], rows["perplexity_ratio"], label=model)
    offsets = label_offsets(published["file_mb"].to_numpy(float), published["perplexity_ratio"].to_numpy(float))
    for row, (dx, dy) in zip(published.itertuples(), offsets, strict=True):
        point = (row.file_mb, row.perplexity_ratio)
        align = "right" if dx < 0 else "left"
        axes.annotate(row.recipe, point, xytext=(dx, dy), textcoords="offset points", fontsize=8, ha=align)
    axes.set_xlabel("file MB")
    axes.set_ylabel("perplexity / float")
    axes.set_title("Size vs quality (lower left is better)")
    axes.grid(alpha=0.3)
    if "model" in published:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def label_offsets(x, y, near: float = 0.06, line_points: float = 10.0) -> list[tuple[float, float]]:
    """Offsets (points) for the labels of points at ``x``, ``y``: a label whose point lies within ``near`` of the
    plot's span of an earlier one (recipes of the same size and quality, the int8 ones often) goes a line below
    the last label there, so that no two labels print over each other; labels of points at the right edge go to
    their left, inside the plot."""
    import numpy as np

    def scaled(values):
        span = np.ptp(values) if len(values) else 0.0
        return (values - values.min()) / span if span > 0 else np.zeros_like(values)

    points, offsets = np.column_stack([scaled(x), scaled(y)]), []
    for i, point in enumerate(points):
        crowded = [offsets[j][1] for j in range(i) if np.all(np.abs(points[j] - point) < near)]
        offsets.append((-4.0 if point[0] > 0.8 else 4.0, min(crowded) - line_points if crowded else 4.0))
    return offsets


def embedded_png(png: bytes, title: str = "size vs quality") -> str:
    """Markdown the Dagster UI renders as the image itself."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"


# --- a budget recipe's search (search.py), from its manifest's `search` trace ---------------------------


def _cost_name(trace: dict[str, Any]) -> str:
    return "log ppl ratio" if trace["gate"] == "max_perplexity_ratio" else "KL"


def search_summary(trace: dict[str, Any]) -> str:
    """One line: the budget, what was chosen, what it verified at and what the search cost."""
    final = trace["rounds"][-1]
    counts: dict[str, int] = {}
    for scheme in final["assignment"].values():
        counts[scheme] = counts.get(scheme, 0) + 1
    chosen = ", ".join(f"{n} x {scheme}" for scheme, n in sorted(counts.items(), key=lambda item: -item[1]))
    return (
        f"{trace['gate']} {trace['budget']:g} over {len(final['assignment'])} components: {chosen}; verified "
        f"{_cost_name(trace)} {final['verified']:.4g} in round {len(trace['rounds'])}; {trace['quantize_passes']} "
        f"quantize passes, {trace['seconds']:.0f} s"
    )


def search_markdown(recipe: str, trace: dict[str, Any]) -> str:
    """What the search measured and chose: its budget and cost, the rounds it verified, and per component the
    chosen scheme, its bytes against float and what each candidate was measured to add."""
    cost = _cost_name(trace)
    rounds = pd.DataFrame(
        [
            {
                "round": i,
                f"target {cost}": r["target"],
                f"predicted {cost}": r["predicted"],
                f"verified {cost}": r["verified"],
                "weights MB": r["weight_bytes"] / 1e6,
            }
            for i, r in enumerate(trace["rounds"], 1)
        ]
    )
    chosen = trace["rounds"][-1]["assignment"]
    by_component: dict[str, dict[str, Any]] = {}
    for s in trace["sensitivities"]:
        row = by_component.setdefault(
            s["component"],
            {"component": s["component"], "chosen": chosen[s["component"]], "float MB": 0.0, "MB": 0.0},
        )
        row["float MB"] = trace["float_weight_bytes"].get(s["component"], 0) / 1e6
        row[f"{s['scheme']} {cost}"] = s["cost"]
        if s["scheme"] == chosen[s["component"]]:
            row["MB"] = s["weight_bytes"] / 1e6
    head = (
        f"**Search for {recipe}**: {trace['gate']} {trace['budget']:g} over {', '.join(trace['schemes'])}; "
        f"{trace['quantize_passes']} quantize and {trace['scoring_passes']} scoring passes "
        f"({trace['cached_sensitivities']} sensitivities from the cache), {trace['seconds']:.1f} s. Sensitivity: "
        f"each component quantized alone, scored on {trace['sensitivity_tokens']} tokens of the eval text."
    )
    return "\n\n".join(
        [
            head,
            rounds.to_markdown(index=False, floatfmt=".4g"),
            pd.DataFrame(list(by_component.values())).to_markdown(index=False, floatfmt=".3g"),
        ]
    )


def search_png(recipe: str, trace: dict[str, Any]) -> bytes:
    """What each block's attention and feed-forward add with each candidate (log scale), the chosen marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    chosen = trace["rounds"][-1]["assignment"]
    points = pd.DataFrame(trace["sensitivities"])
    kind_block = points["component"].str.split(".", expand=True)
    points["kind"], points["block"] = kind_block[0], pd.to_numeric(kind_block.get(1), errors="coerce")
    floor = max(points["cost"][points["cost"] > 0].min() if (points["cost"] > 0).any() else 1e-9, 1e-12)
    for (kind, scheme), rows in points[points["block"].notna()].groupby(["kind", "scheme"]):
        rows = rows.sort_values("block")
        axes.plot(rows["block"], rows["cost"].clip(lower=floor), marker=".", label=f"{kind}, {scheme}")
        picked = rows[[chosen[c] == scheme for c in rows["component"]]]
        axes.scatter(picked["block"], picked["cost"].clip(lower=floor), s=80, facecolors="none", edgecolors="black")
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("block")
    axes.set_ylabel(f"{_cost_name(trace)} added, alone")
    axes.set_title(f"{recipe}: sensitivity per block (circled: chosen)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
