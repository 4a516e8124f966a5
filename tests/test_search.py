"""Recipe search under a quality budget: the choice (exact, against brute force), and the whole graph on the demo
model: a one-line budget in recipes.yaml (the golden build's `kl_budget`) is resolved, verified, published within
its budget and smaller than dynamic_int8, with its trace in the manifest and the report; on a copy of that build, a
second budget reuses the sensitivities and one that cannot be met fails with what came closest."""

import itertools
import json

import numpy as np
import pytest
from conftest import DEMO_MODEL, metadata
from demo_build import SEARCH_BUDGET as BUDGET

from edge_quant_pipeline.publish.store import published_versions
from edge_quant_pipeline.runs.launch import materialize
from edge_quant_pipeline.search import STEPS, Option, choose


def test_choice_is_the_smallest_within_the_target_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        options = {
            f"c{i}": [Option(f"s{j}", float(rng.uniform(0, 0.4)), int(rng.integers(1, 100))) for j in range(3)]
            for i in range(4)
        }
        target = float(rng.uniform(0.1, 1.0))
        chosen = choose(options, target)
        # brute force, with costs rounded up to the choice's steps as it rounds them
        unit = target / STEPS
        feasible = [
            combo
            for combo in itertools.product(*options.values())
            if sum(np.ceil(o.cost / unit - 1e-9) for o in combo) <= STEPS
        ]
        if not feasible:
            assert chosen is None
            continue
        best = min(sum(o.weight_bytes for o in combo) for combo in feasible)
        assert sum(o.weight_bytes for o in chosen.values()) == best
        assert sum(o.cost for o in chosen.values()) <= target + 1e-9


@pytest.fixture(scope="module")
def searched(golden):
    """A copy of the golden build, whose recipes.yaml holds `kl_budget`; the tests below add budgets to it."""
    with golden.sandbox() as build, build.instance() as instance:
        yield instance, build.pipeline, build.root / "recipes.yaml"


def manifest(pipeline, recipe: str) -> dict:
    (found,) = published_versions(pipeline.store, DEMO_MODEL, recipe)
    return found


def test_a_budget_is_published_within_it_and_smaller_than_int8(searched):
    instance, pipeline, _ = searched
    searched_manifest, int8 = manifest(pipeline, "kl_budget"), manifest(pipeline, "dynamic_int8")
    metrics, trace = searched_manifest["metrics"], searched_manifest["search"]
    assert metrics["mean_kl"] <= BUDGET and searched_manifest["gates"]["max_mean_kl"] == BUDGET
    assert metrics["weight_bytes"] <= 0.9 * int8["metrics"]["weight_bytes"]
    # the published evaluation scores what the search verified last, on the same text
    assert metrics["mean_kl"] == pytest.approx(trace["rounds"][-1]["verified"], rel=1e-6)
    # the resolved recipe is concrete: every component and block named, as the file holds it (conformance passed)
    resolved = searched_manifest["resolved_spec"]
    assert resolved["embedding"] and set(resolved["attention"]) == set(resolved["feedforward"]) == {"0", "1", "2", "3"}
    assert "int4_dynamic_block32" in {*resolved["attention"].values(), *resolved["feedforward"].values()}
    assert searched_manifest["recipe_spec"]["search"]["max_mean_kl"] == BUDGET
    # every component measured with both candidates: 9 x 2 sensitivity passes, then a pass per round
    assert trace["quantize_passes"] == 18 + len(trace["rounds"]) and trace["cached_sensitivities"] == 0


def test_the_search_shows_in_the_ui_and_the_report(searched):
    instance, pipeline, _ = searched
    partition = f"{DEMO_MODEL}|kl_budget"
    resolved = metadata(instance, "resolved_recipe", partition)
    assert resolved["searched"] is True and "| component" in resolved["search_assignment"]
    assert resolved["search_quantize_passes"] >= 19
    report = metadata(instance, "quantization_report", DEMO_MODEL)
    assert "**Search for kl_budget**: max_mean_kl 0.0024" in report["search_kl_budget"]
    assert "data:image/png;base64," in report["search_kl_budget"]
    assert (pipeline.store / DEMO_MODEL / "search-kl_budget.png").read_bytes().startswith(b"\x89PNG")


def test_another_budget_reuses_every_sensitivity(searched):
    instance, pipeline, recipes = searched
    recipes.write_text(
        recipes.read_text()
        + "  looser:\n    search: {max_mean_kl: 0.006, schemes: [int8_dynamic, int4_dynamic_block32]}\n"
    )
    summary = materialize(instance, pipeline, [DEMO_MODEL], ["looser"], jobs=1)
    assert summary.failures == 0
    looser, tight = manifest(pipeline, "looser"), manifest(pipeline, "kl_budget")
    trace = looser["search"]
    assert trace["cached_sensitivities"] == 18 and trace["quantize_passes"] == len(trace["rounds"])
    assert looser["metrics"]["mean_kl"] <= 0.006
    assert looser["metrics"]["weight_bytes"] < tight["metrics"]["weight_bytes"]


def test_an_unreachable_budget_fails_its_partition_with_what_came_closest(searched):
    instance, pipeline, recipes = searched
    recipes.write_text(
        recipes.read_text() + "  impossible:\n    search: {max_mean_kl: 1.0e-9, schemes: [int4_dynamic_block32]}\n"
    )
    summary = materialize(instance, pipeline, [DEMO_MODEL], ["impossible"], jobs=1)
    assert summary.failures == 1
    failure = json.loads((pipeline.store / DEMO_MODEL / "impossible" / "failed.json").read_text())
    assert failure["stage"] == "search"
    assert (
        "no assignment of int4_dynamic_block32 met max_mean_kl 1e-09 on this model; the closest verified mean KL"
        in (failure["error"])
    )
