"""The UI as users see it: the real webserver on the test instance, pages read in headless Chromium.

Needs Debian's chromium (`.ci/run` installs it) and the playwright package (dev extra),
which drives that browser; nothing is downloaded at run time."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import DEMO_MODEL

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.services,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]
# Without these, Chromium keeps trying to reach Google's services, which this network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "dagster-webserver exited"
        try:
            urllib.request.urlopen(f"{url}/server_info", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dagster-webserver did not answer at {url} within {seconds} s")


@pytest.fixture(scope="module")
def webserver(golden):
    """dagster-webserver on a copy of the golden build (the UI may write to its instance)."""
    with golden.sandbox() as build:
        yield from serve(build.root / "instance", build.pipeline)


def serve(home: Path, pipeline):
    (home / "dagster.yaml").write_text("nux:\n  enabled: false\ntelemetry:\n  enabled: false\n")
    settings = {
        "EDGE_QUANT_CHECKPOINT_DIR": pipeline.checkpoint_dir,
        "EDGE_QUANT_ARTIFACT_DIR": pipeline.artifact_store.url,
        "EDGE_QUANT_WORK_DIR": pipeline.work_dir,
        "EDGE_QUANT_RECIPES": pipeline.recipes_file,
    }
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-webserver"),
            "-m",
            "edge_quant_pipeline.definitions",
            "-h",
            "127.0.0.1",
            "-p",
            url.rsplit(":", 1)[1],
        ],
        env={**os.environ, **settings, "DAGSTER_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_partition(browser, url: str, asset: str, partition: str, wait_for: str):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(f"{url}/assets/{asset}?view=partitions&partition={partition.replace('|', '%7C')}")
    page.get_by_text(wait_for, exact=True).first.wait_for(timeout=60_000)
    return page


def test_a_partition_page_shows_its_evaluation_metrics(webserver, browser):
    page = open_partition(browser, webserver, "evaluation", f"{DEMO_MODEL}|dynamic_int8", "perplexity_ratio")
    text = page.inner_text("body")
    for label in (
        "perplexity_ratio",
        "mean_kl",
        "top1_agreement",
        "logits_sqnr_db",
        "generation_agreement",
        "decode_tokens_per_s",
        "peak_rss_mb",
        "error_hotspots",
    ):
        assert label in text
    assert "Materialized" in text


def test_the_report_page_shows_the_table_and_the_plot(webserver, browser):
    page = open_partition(browser, webserver, "quantization_report", DEMO_MODEL, "size_vs_quality")
    show_buttons = page.get_by_text("[Show Markdown]")
    assert page.get_by_text("report", exact=True).count() >= 1

    show_buttons.nth(0).click()  # the report table
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("selective_fp16_int8").first.wait_for(timeout=30_000)
    table = dialog.inner_text()
    for recipe in ("float", "dynamic_int8", "dynamic_int4_block128", "selective_fp16_int8"):
        assert recipe in table
    assert "published" in table and "ppl / float" in table
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    show_buttons.nth(1).click()  # the size-vs-quality plot
    plot = page.get_by_role("dialog").locator("img").first
    plot.wait_for(timeout=30_000)
    assert plot.evaluate("img => img.complete && img.naturalWidth > 100")
    page.screenshot(path=str(Path(os.environ["EDGE_QUANT_WORK_DIR"]) / "ui_report_plot.png"))
