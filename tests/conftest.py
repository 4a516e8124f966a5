"""Shared fixtures, and the suite's tiers.

The demo graph is built once per session (``golden``, tests/demo_build.py) and read by every test that only reads;
a test that changes it gets ``demo_sandbox``, a copy. Tiers are markers (pyproject.toml): ``graph``, ``services``,
``families``, ``matrix``; a test with none of them is ``fast`` (``pytest -m fast``, before a commit). Under
pytest-xdist every test of the golden build runs on one worker, which builds it once.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from demo_build import DEMO_MODEL, DemoBuild, build_demo
from servers import S3_CREDENTIALS, moto_server, postgres_server

REPO = Path(__file__).parent.parent
TIERS = ("graph", "services", "families", "matrix")
# Tests that read or copy the golden build: they run where it was built.
GOLDEN_FIXTURES = {"golden", "golden_instance", "demo_sandbox"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        golden = bool(GOLDEN_FIXTURES & set(item.fixturenames))
        if golden:
            item.add_marker(pytest.mark.graph)
        # Under `pytest -n` (--dist loadgroup): the tests of the golden build run where it was built, and the
        # others stay with their module, whose module-scoped fixtures are then made once.
        item.add_marker(pytest.mark.xdist_group("golden" if golden else item.module.__name__))
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session", autouse=True)
def session_settings(tmp_path_factory):
    """Where code that reads its settings from the environment puts its files: this session's folders, never
    the checkout; and a memory ledger (with its latency lock) per pytest process, so that two xdist workers do
    not wait for each other's latency measurements."""
    folder = tmp_path_factory.mktemp("settings")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_QUANT_ARTIFACT_DIR", str(folder / "artifacts"))
        patch.setenv("EDGE_QUANT_WORK_DIR", str(folder / "work"))
        patch.setenv("EDGE_QUANT_MEMORY_LEDGER", str(folder / "memory-ledger.json"))
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        yield folder


def _recipe_catalog():
    from edge_quant_pipeline import settings
    from edge_quant_pipeline.quantize.catalog import load_catalog

    return load_catalog(settings.recipes_file())


# The catalog the code location loads from the checkout (./recipes.yaml plus the built-in recipes).
recipe_catalog = _recipe_catalog()


# Llama 3.1/3.2's RoPE scaling, with an original context short enough (32 tokens) that the scaling changes the
# frequencies tiny test models use.
LLAMA3_ROPE = dict(
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )
)


def move_off_initial_values(model):
    """Every parameter of a freshly initialised model moved (norm weights start as all ones or zeros), so that
    a tensor mapped to the wrong place changes the logits."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def metadata(instance, asset: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    assert records, f"{asset} [{partition}] was not materialized"
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def scramble_weights(tflite: Path, component: str) -> bytes:
    """The file with every weight buffer of ``component`` overwritten by random bytes (structure intact)."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    from edge_quant_pipeline.weights import read_weights

    data = bytearray(tflite.read_bytes())
    model = schema.Model.GetRootAs(bytes(data), 0)
    rng = np.random.default_rng(0)
    for weight in read_weights(tflite):
        if weight.component == component:
            buffer = model.Buffers(weight.buffer)
            # inline data is found by its bytes; ai-edge-quantizer stores it after the flatbuffer
            offset, size = (buffer.Offset(), buffer.Size()) if buffer.Size() else (None, buffer.DataLength())
            if offset is None:
                offset = bytes(data).find(buffer.DataAsNumpy().tobytes())
            assert offset > 0
            data[offset : offset + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return bytes(data)


@pytest.fixture(scope="session")
def demo_checkpoint_dir() -> Path:
    from edge_quant_pipeline.settings import DEMO_CHECKPOINT_DIR

    return DEMO_CHECKPOINT_DIR / DEMO_MODEL


@pytest.fixture(scope="session")
def golden(tmp_path_factory, demo_checkpoint_dir) -> DemoBuild:
    """The whole graph materialized once, through Dagster, for the bundled demo model and every recipe the suite
    reads (tests/demo_build.py)."""
    return build_demo(tmp_path_factory.mktemp("demo") / "build", demo_checkpoint_dir, REPO / "recipes.yaml")


@pytest.fixture(scope="session")
def golden_instance(golden):
    with golden.instance() as instance:
        yield instance


@dataclass
class DemoSandbox:
    build: DemoBuild
    instance: dg.DagsterInstance

    @property
    def pipeline(self):
        return self.build.pipeline


@pytest.fixture
def demo_sandbox(golden) -> DemoSandbox:
    """A copy of the golden build to change: its instance, checkpoints, store and work folder."""
    with golden.sandbox() as build, build.instance() as instance:
        yield DemoSandbox(build, instance)


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory, demo_checkpoint_dir):
    """The demo model exported once for the session: (its architecture, its float .tflite)."""
    from edge_quant_pipeline.checkpoints.validate import read_checkpoint
    from edge_quant_pipeline.export.generative import export_float_tflite
    from edge_quant_pipeline.export.load import architecture_of, load_float_model
    from edge_quant_pipeline.shapes import ExportSettings

    checkpoint = read_checkpoint(demo_checkpoint_dir)
    architecture = architecture_of(checkpoint)
    model = load_float_model(checkpoint, ExportSettings.kv_cache_len)
    output = tmp_path_factory.mktemp("demo-export") / "float.tflite"
    return architecture, export_float_tflite(model, architecture.model_config, ExportSettings(), output)


@pytest.fixture(scope="session")
def demo_calibration(tmp_path_factory, demo_export, demo_checkpoint_dir):
    """Calibration statistics of the demo's float .tflite on the default calibration text (4 windows)."""
    from edge_quant_pipeline.evaluate.reference import tokenize
    from edge_quant_pipeline.quantize.calibration import calibrate
    from edge_quant_pipeline.settings import DEFAULT_CALIBRATION_TEXT
    from edge_quant_pipeline.shapes import ExportSettings

    tokens = tokenize(DEFAULT_CALIBRATION_TEXT, demo_checkpoint_dir, 256)
    output = tmp_path_factory.mktemp("demo-calibration")
    return calibrate(demo_export[1], tokens, ExportSettings(), 4, DEFAULT_CALIBRATION_TEXT, 2, output)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A folder on another filesystem than ``tmp_path`` (tmpfs), from which publishing copies instead of linking."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no tmpfs at /dev/shm on another filesystem")
    with tempfile.TemporaryDirectory(dir=shm) as folder:
        yield Path(folder)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (tests/servers.py); each test makes its own database."""
    with postgres_server() as server:
        yield server


@pytest.fixture
def dagster_home(postgres, tmp_path, monkeypatch) -> Path:
    """A DAGSTER_HOME holding the production profile as shipped, its database new for this test."""
    import shutil

    monkeypatch.setenv("EDGE_QUANT_POSTGRES_URL", postgres.create_database())
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    return home


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server (tests/servers.py) with a bucket `artifacts`; the environment points s3fs (here and in
    child processes) at it."""
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        saved = {k: os.environ.get(k) for k in [*S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3"]}
        os.environ.update({**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint})
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(S3_BUCKET)
        yield endpoint
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


S3_BUCKET = "artifacts"
