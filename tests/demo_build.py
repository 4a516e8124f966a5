"""The demo graph built once per pytest session (the golden build), and cheap copies for tests that change it.

Building the demo graph is the suite's most expensive step (an export, then a quantization, an interpreter
evaluation and a LiteRT-LM check per recipe). Tests that only read what a full run leaves behind share one build;
tests that change it (damage weights, republish, add a checkpoint, tighten a gate) get a sandbox: a copy of the
whole build (instance, checkpoints, store, work folder) at the build's own path, while the untouched build waits
beside it. Every path the instance recorded (metadata, pickled step outputs, manifests) then names the copy, so
nothing written in a sandbox reaches the build, and the next test finds it as it was.
"""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from edge_quant_pipeline.config import ArtifactStore, PipelineConfig
from edge_quant_pipeline.quantize.catalog import load_catalog
from edge_quant_pipeline.runs.launch import LaunchSummary, materialize

DEMO_MODEL = "tiny-llama-bytes"
# The repository's recipes.yaml, plus what the suite needs beyond the defaults: a static recipe (the calibration
# statistics cross steps; test_celery.py defines the same spec) and a quality budget for the recipe search.
SEARCH_BUDGET = 0.0024  # between the demo's dynamic_int8 (KL 0.0003) and dynamic_int4_block32 (0.019)
EXTRA_RECIPES = f"""
  static_int8_a16:
    default: int8_static_a16
    embedding: int8_dynamic
  kl_budget:
    search: {{max_mean_kl: {SEARCH_BUDGET}, schemes: [int8_dynamic, int4_dynamic_block32]}}
"""


@dataclass
class DemoBuild:
    root: Path  # everything the build is made of lives under it
    summary: LaunchSummary

    @property
    def pipeline(self) -> PipelineConfig:
        return pipeline_at(self.root)

    @property
    def recipes(self) -> list[str]:
        return load_catalog(self.root / "recipes.yaml").names

    @contextmanager
    def instance(self) -> Iterator[dg.DagsterInstance]:
        home = self.root / "instance"
        home.mkdir(parents=True, exist_ok=True)
        # DAGSTER_HOME is left alone: tests that start `edge-quant run` or a webserver set their own.
        with dg.instance_for_test(temp_dir=str(home), set_dagster_home=False) as instance:
            yield instance

    @contextmanager
    def sandbox(self) -> Iterator["DemoBuild"]:
        """A copy of the build at its own path, for the block; the build as it was afterwards."""
        kept = self.root.with_name(f"{self.root.name}.kept")
        if kept.exists():
            raise RuntimeError("a sandbox of the demo build is already open; sandboxes do not nest")
        self.root.rename(kept)
        try:
            shutil.copytree(kept, self.root, symlinks=True)
            yield self
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            kept.rename(self.root)


def pipeline_at(root: Path) -> PipelineConfig:
    return PipelineConfig(
        checkpoint_dir=str(root / "checkpoints"),
        artifact_store=ArtifactStore(url=str(root / "artifacts")),
        work_dir=str(root / "work"),
        recipes_file=str(root / "recipes.yaml"),
    )


def build_demo(root: Path, checkpoint: Path, recipes_yaml: Path) -> DemoBuild:
    """The demo checkpoint through the whole graph with every recipe of ``recipes_yaml`` plus ``EXTRA_RECIPES``, as
    `edge-quant run` runs it (two worker processes)."""
    shutil.copytree(checkpoint, root / "checkpoints" / DEMO_MODEL)
    (root / "recipes.yaml").write_text(recipes_yaml.read_text().rstrip() + "\n" + EXTRA_RECIPES)
    build = DemoBuild(root, LaunchSummary())
    with build.instance() as instance:
        build.summary = materialize(instance, build.pipeline, [DEMO_MODEL], build.recipes, jobs=2)
    return build
