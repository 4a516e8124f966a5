"""Configuration checked before any work: the real `edge-quant` command and the code location as Dagster loads it,
with bad EDGE_QUANT_* settings and a bad recipes.yaml. Each problem is one line naming what, the value and the fix."""

import os
import subprocess
import sys
from operator import attrgetter
from pathlib import Path

import pytest

from edge_quant_pipeline.cli import checked_recipes
from edge_quant_pipeline.quantize.recipes import RecipeError
from edge_quant_pipeline.settings import DEMO_CHECKPOINT_DIR

BAD_SCHEME = "recipes:\n  good: {default: fp16}\n  bad:\n    default: int3\n"


def environment(home: Path, **settings: str) -> dict[str, str]:
    """This process's environment (PYTHONPATH, the venv) with only the given EDGE_QUANT_* settings, all in ``home``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_QUANT_")}
    return {
        **inherited,
        "DAGSTER_HOME": str(home),
        "EDGE_QUANT_ARTIFACT_DIR": str(home / "artifacts"),
        "EDGE_QUANT_WORK_DIR": str(home / "work"),
        **settings,
    }


def edge_quant_run(home: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_quant_pipeline.cli", "run", *args],
        cwd=home,  # ./recipes.yaml is the default recipes file
        env=environment(home, **settings),
        capture_output=True,
        text=True,
        timeout=600,
    )


def refused(result: subprocess.CompletedProcess, home: Path, made: set[str] = frozenset()) -> list[str]:
    """The lines `edge-quant run` printed, after checking it stopped before any work and without a traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""  # not even the instance line: nothing started
    assert {p.name for p in home.iterdir()} == set(made)  # no instance storage, work files or artifacts
    return result.stderr.splitlines()


def test_a_missing_eval_text_is_one_line_before_the_export(tmp_path):
    result = edge_quant_run(tmp_path, EDGE_QUANT_EVAL_TEXT="held-out.txt")
    assert refused(result, tmp_path) == [
        f"EDGE_QUANT_EVAL_TEXT='held-out.txt': no such file ({tmp_path / 'held-out.txt'}); set it to a UTF-8 text "
        "file of held-out text, or unset it for the demo's."
    ]


def test_a_mistyped_model_is_one_line_before_any_work(tmp_path):
    """A typo would otherwise become a model partition that fails for good and fails every later run."""
    result = edge_quant_run(tmp_path, "--model", "does-not-exist")
    assert refused(result, tmp_path) == [
        f"--model 'does-not-exist': no checkpoint folder of that id in {DEMO_CHECKPOINT_DIR}; the checkpoints there: "
        f"{', '.join(sorted(p.name for p in DEMO_CHECKPOINT_DIR.iterdir() if (p / 'config.json').is_file()))}."
    ]


def test_each_bad_setting_gets_its_own_line(tmp_path):
    result = edge_quant_run(
        tmp_path,
        EDGE_QUANT_STEP_MEMORY_MB="2GB",
        EDGE_QUANT_EXPORTER="onnx",
        EDGE_QUANT_NIGHTLY_TIMEZONE="Mars/Olympus",
        EDGE_QUANT_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
        EDGE_QUANT_EVAL_TXT="typo.txt",
    )
    expected = [
        "EDGE_QUANT_EVAL_TXT='typo.txt' is not a setting of this pipeline; did you mean EDGE_QUANT_EVAL_TEXT?",
        f"EDGE_QUANT_CHECKPOINT_DIR='{tmp_path / 'checkpoints'}': no folder {tmp_path / 'checkpoints'}; set it to",
        "EDGE_QUANT_EXPORTER='onnx' names no exporter; use one of auto, generative_api, export_hf.",
        "EDGE_QUANT_STEP_MEMORY_MB='2GB': expected a positive whole number of megabytes.",
        "EDGE_QUANT_NIGHTLY_TIMEZONE='Mars/Olympus' is not a time zone; use an IANA name",
    ]
    lines = refused(result, tmp_path)
    assert len(lines) == len(expected)
    assert [line[: len(start)] for line, start in zip(lines, expected, strict=True)] == expected


def test_recipes_yaml_that_is_not_yaml_is_one_line_with_its_line(tmp_path):
    (tmp_path / "recipes.yaml").write_text("recipes:\n  mine:\n\tdefault: fp16\n")
    lines = refused(edge_quant_run(tmp_path), tmp_path, made={"recipes.yaml"})
    assert lines == [
        f"{tmp_path / 'recipes.yaml'}, line 3, column 1: not valid YAML: found character '\\t' that cannot start "
        "any token while scanning for the next token."
    ]


def test_an_invalid_recipe_is_one_line_with_file_and_line(tmp_path):
    (tmp_path / "recipes.yaml").write_text(BAD_SCHEME)
    lines = refused(edge_quant_run(tmp_path), tmp_path, made={"recipes.yaml"})
    assert lines == [
        f"{tmp_path / 'recipes.yaml'}, line 3: recipe 'bad', field 'default': unknown scheme 'int3'. Allowed "
        "schemes: int8_dynamic, int8_weight_only, fp16, int4_dynamic_block32, int4_dynamic_block64, "
        "int4_dynamic_block128, int4_dynamic_block256, int4_dynamic, int4_weight_only, int2_dynamic, int8_static_a8, "
        "int8_static_a16, int4_static_a8, int4_static_a16."
    ]


def test_a_run_that_leaves_the_invalid_recipe_out_may_start(tmp_path, monkeypatch):
    (tmp_path / "recipes.yaml").write_text(BAD_SCHEME)
    monkeypatch.setenv("EDGE_QUANT_RECIPES", str(tmp_path / "recipes.yaml"))
    assert checked_recipes(["good", "fp16"]) == ["good", "fp16"]
    with pytest.raises(RecipeError, match=r"^\S+recipes.yaml, line 3: recipe 'bad'"):
        checked_recipes(None)


def load_code_location(home: Path, **settings: str) -> subprocess.CompletedProcess:
    """The code location loaded as `dagster dev` and the code server load it."""
    return subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "edge_quant_pipeline.definitions"],
        cwd=home,
        env=environment(home, **settings),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_code_location_does_not_load_with_a_bad_setting(tmp_path):
    result = load_code_location(tmp_path, EDGE_QUANT_EVAL_TEXT=str(tmp_path / "missing.txt"))
    assert result.returncode != 0
    assert (
        f"SettingError: EDGE_QUANT_EVAL_TEXT='{tmp_path / 'missing.txt'}': no such file ({tmp_path / 'missing.txt'});"
        in result.stdout + result.stderr
    )


def test_the_code_location_names_the_line_of_bad_yaml(tmp_path):
    (tmp_path / "recipes.yaml").write_text("recipes:\n  mine: {default: fp16\n  other: fp16\n")
    result = load_code_location(tmp_path)
    assert result.returncode != 0
    assert (
        f"RecipeError: {tmp_path / 'recipes.yaml'}, line 3, column 8: not valid YAML: expected ',' or '}}', but got "
        "':' while parsing a flow mapping.\n" in result.stdout + result.stderr
    )


def test_every_setting_that_shapes_an_asset_is_a_variable_the_pipeline_reads(monkeypatch, tmp_path):
    """What the UI's `pipeline` resource can change, `edge-quant run` can too, from the environment."""
    from edge_quant_pipeline.config import pipeline_config_from_env

    variables = {
        "EDGE_QUANT_PREFILL_LEN": ("export.prefill_len", "16", 16),
        "EDGE_QUANT_KV_CACHE_LEN": ("export.kv_cache_len", "64", 64),
        "EDGE_QUANT_EXPORTER": ("export.exporter", "export_hf", "export_hf"),
        "EDGE_QUANT_EVAL_MAX_TOKENS": ("evaluation.max_tokens", "512", 512),
        "EDGE_QUANT_LOCALIZE_ERRORS": ("evaluation.localize_errors", "off", False),
        "EDGE_QUANT_HOTSPOTS_TOP_N": ("evaluation.hotspots_top_n", "3", 3),
        "EDGE_QUANT_CALIBRATION_SAMPLES": ("calibration.samples", "4", 4),
        "EDGE_QUANT_INTERPRETER_THREADS": ("interpreter_threads", "1", 1),
    }
    for name, (_, value, _) in variables.items():
        monkeypatch.setenv(name, value)
    pipeline = pipeline_config_from_env()
    assert {name: attrgetter(field)(pipeline) for name, (field, _, _) in variables.items()} == {
        name: expected for name, (_, _, expected) in variables.items()
    }


def test_tasks_are_names_files_or_none_and_a_missing_file_is_one_line(monkeypatch, tmp_path):
    from edge_quant_pipeline import settings

    monkeypatch.setenv("EDGE_QUANT_TASKS", f"hellaswag, {tmp_path}")
    assert settings.tasks() == ["hellaswag", str(tmp_path)]
    monkeypatch.setenv("EDGE_QUANT_TASKS", "none")
    assert settings.tasks() == []
    monkeypatch.setenv("EDGE_QUANT_TASKS", "demo_cloze,tasks/mine.yaml")
    with pytest.raises(settings.SettingError, match=r"no task file or folder tasks/mine\.yaml; name lm-eval tasks"):
        settings.tasks()


def test_settings_shows_each_value_and_where_it_came_from(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "edge_quant_pipeline.cli", "settings"],
        cwd=tmp_path,
        env=environment(tmp_path, EDGE_QUANT_KV_CACHE_LEN="256", EDGE_QUANT_PREFILL_LEN="512"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines()[2:] if line.startswith("EDGE")}
    assert rows["EDGE_QUANT_EVAL_MAX_TOKENS"] == ["2048", "default"]
    assert rows["EDGE_QUANT_PREFILL_LEN"] == ["512", "environment"]
    assert rows["EDGE_QUANT_KV_CACHE_LEN"] == ["(see", "below)", "problem"]
    assert shown.returncode == 2 and shown.stdout.rstrip().endswith(
        "EDGE_QUANT_KV_CACHE_LEN='256': shorter than the prefill length (512); make it at least that."
    )


def test_a_text_is_hashed_once_per_process_while_it_stays_the_same(tmp_path):
    from edge_quant_pipeline.config import _sha256, text_sha256

    text = tmp_path / "eval.txt"
    text.write_text("one")
    first = text_sha256(text)
    misses = _sha256.cache_info().misses
    assert text_sha256(text) == first and _sha256.cache_info().misses == misses
    text.write_text("other")
    os.utime(text, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    assert text_sha256(text) != first
