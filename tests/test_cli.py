"""What `edge-quant run` prints, as a user runs it: a line per run with its outcome and, under a failed run, why;
the libraries' output only in the run logs, unless --verbose."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_MODEL, REPO

pytestmark = pytest.mark.graph

# A recipe that can only fail its gate: no quantized model has zero KL.
RECIPES_YAML = "recipes:\n  int8_never_good_enough:\n    default: int8_dynamic\n    gates: {max_mean_kl: 0.0}\n"
# What TensorFlow, absl, torch, litert-torch, ai-edge-quantizer and LiteRT write while the demo runs.
QUANTIZER_PROGRESS = "Applying Transformations to tensors"  # ai-edge-quantizer's, in every quantization
LIBRARY_OUTPUT = (
    "LiteRT-Torch Convert",
    "absl",
    "cudart_stub",
    "Quantized data for tensor",
    "INFO: [",
    QUANTIZER_PROGRESS,
)


@pytest.fixture(scope="module")
def home(tmp_path_factory, demo_checkpoint_dir) -> Path:
    home = tmp_path_factory.mktemp("cli")
    shutil.copy(REPO / "dagster.yaml", home)
    shutil.copytree(demo_checkpoint_dir, home / "checkpoints" / DEMO_MODEL)
    # A checkpoint refused at its `checkpoint` step: its runs fail or are skipped, the other model's go on.
    refused = shutil.copytree(demo_checkpoint_dir, home / "checkpoints" / "mamba")
    config = json.loads((refused / "config.json").read_text())
    (refused / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    (home / "recipes.yaml").write_text(RECIPES_YAML)
    return home


def edge_quant(home: Path, *args: str) -> str:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EDGE_QUANT_")},
        "DAGSTER_HOME": str(home),
        "EDGE_QUANT_CHECKPOINT_DIR": str(home / "checkpoints"),
        "EDGE_QUANT_ARTIFACT_DIR": str(home / "artifacts"),
        "EDGE_QUANT_WORK_DIR": str(home / "work"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "edge_quant_pipeline.cli", *args],
        cwd=home,  # dagster.yaml's storage paths and ./recipes.yaml are relative to it
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    return result.stdout


@pytest.fixture(scope="module")
def first_run(home) -> str:
    return edge_quant(home, "run", "--recipe", "float", "--recipe", "int8_never_good_enough")


def test_each_run_gets_a_line_and_a_failed_one_its_reason(first_run):
    lines = first_run.splitlines()
    for job, label in [
        ("convert_checkpoint", DEMO_MODEL),
        ("resolve_recipe", "float"),
        ("quantize_evaluate_publish", f"{DEMO_MODEL}|float"),
        ("report", DEMO_MODEL),
    ]:
        assert any(re.fullmatch(rf"\s+{job}\s+{re.escape(label)}\s+[\d.]+s\s+ok", line) for line in lines), first_run
    failed = next(i for i, line in enumerate(lines) if f"{DEMO_MODEL}|int8_never_good_enough" in line)
    assert lines[failed].endswith("FAILED")
    assert "check quality_gates: mean_kl = " in lines[failed + 1] and "fails max_mean_kl 0" in lines[failed + 1]
    assert re.search(r"run [0-9a-f-]{36}: its logs are in `dagster dev`", lines[failed + 2])
    assert "check quality_gates" in first_run


def test_a_model_that_cannot_be_converted_fails_alone_with_its_reason(first_run):
    lines = first_run.splitlines()
    failed = next(i for i, line in enumerate(lines) if re.match(r"\s+convert_checkpoint\s+mamba ", line))
    assert lines[failed].endswith("FAILED") and "model_type 'mamba' is not supported" in lines[failed + 1]
    for label in (
        r"quantize_evaluate_publish\s+mamba\|float",
        r"quantize_evaluate_publish\s+mamba\|int8_never_good_enough",
        r"report\s+mamba",
    ):
        skipped = next(i for i, line in enumerate(lines) if re.match(rf"\s+{label}\b", line))
        assert lines[skipped].endswith("not run") and "skipped: its convert_checkpoint run failed" in lines[skipped + 1]
    assert f"\n{DEMO_MODEL}\n\n| recipe " in first_run  # the other model's table is printed
    table = [line for line in lines if line.startswith("|")]
    assert max(map(len, table)) <= 130 and "Champion (smallest published): " in first_run  # a terminal shows it
    assert first_run.rstrip().endswith("run(s) failed; see them with `dagster dev`.")


def test_the_libraries_output_is_in_the_run_logs_not_on_the_terminal(first_run, home):
    assert not [marker for marker in LIBRARY_OUTPUT if marker in first_run], first_run
    assert "Traceback" not in first_run and "Warning" not in first_run
    # The steps' stdout and stderr, as the UI shows them (dagster.yaml: compute_logs)
    compute_logs = [p.read_text(errors="replace") for p in (home / ".dagster" / "logs").rglob("*.[oe][ur][tr]")]
    assert any("LiteRT-Torch Convert" in log for log in compute_logs)  # the export's progress


def test_verbose_shows_the_libraries_output(first_run, home):
    # a recipe the first run did not make: its quantization runs (the export is done)
    output = edge_quant(home, "run", "--model", DEMO_MODEL, "--recipe", "fp16", "--verbose")
    assert QUANTIZER_PROGRESS in output


def test_prune_removes_from_the_work_folder_only_what_no_current_step_reads(first_run, home):
    current = next((home / "work" / DEMO_MODEL).iterdir())  # the one checkpoint version converted
    old_version = shutil.copytree(current, current.with_name("0123456789abcdef-p32-kv128"))
    old_text = shutil.copytree(next(current.glob("float_reference-*")), current / "float_reference-000000000000-2048")
    shutil.copytree(current, home / "work" / "gone-model" / current.name)  # a model whose folder was removed
    # an edited recipe's earlier version: its quantized file and bundle
    quantized = next(current.glob("*-*.tflite"))  # <recipe>-<its hash>.tflite
    recipe = quantized.stem.rsplit("-", 1)[0]
    edited = [shutil.copy(quantized, current / f"{recipe}-0123456789ab{suffix}") for suffix in (".tflite", ".litertlm")]
    listed = edge_quant(home, "prune", "--dry-run")
    assert "Would remove 0 version(s)" in listed and "Would remove 5 folder(s) and file(s)" in listed, listed
    assert old_version.exists() and old_text.exists()
    removed = edge_quant(home, "prune")
    assert f"Removed {old_version} (" in removed and f"Removed {old_text} (" in removed, removed
    assert "a recipe version no current step reads" in removed and not any(Path(f).exists() for f in edited)
    assert quantized.exists()
    assert not old_version.exists() and not old_text.exists() and not (home / "work" / "gone-model").exists()
    assert [p.name for p in (home / "work" / DEMO_MODEL).iterdir()] == [current.name]
    # what the current steps read is all there: nothing to redo
    assert "Everything is up to date" in edge_quant(home, "run", "--model", DEMO_MODEL, "--recipe", "float")
