"""LiteRT-LM bundles, packed from the demo's files and run in the LiteRT-LM runtime itself (no stand-in)."""

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import yaml
from conftest import DEMO_MODEL, metadata

from edge_quant_pipeline.disk import NotEnoughDiskError
from edge_quant_pipeline.evaluate.bundle import BundleError, build_bundle, bundle_path, bundle_spec
from edge_quant_pipeline.evaluate.litert_lm import BundleRejectedError, BundleRequest, run_bundle
from edge_quant_pipeline.evaluate.tasks import DEMO_TASK_FILES, TaskRequest
from edge_quant_pipeline.publish.store import BUNDLE_FILE, MANIFEST
from edge_quant_pipeline.runtime.session import InterpreterSession
from edge_quant_pipeline.settings import DEFAULT_EVAL_TEXT, GENERATIVE_API
from edge_quant_pipeline.shapes import ExportSettings

SETTINGS = ExportSettings()  # the demo's: prefill 32, KV cache 128


def test_every_recipe_of_the_demo_is_bundled_and_runs_in_litert_lm(golden, golden_instance):
    instance = golden_instance
    assert golden.summary.failures == 0
    for recipe in golden.recipes:
        measured = metadata(instance, "evaluation", f"{DEMO_MODEL}|{recipe}")
        assert measured["litert_lm_error"] == "", recipe
        assert measured["litert_lm_prompt_tokens"] == SETTINGS.prefill_len  # the demo has no start token
        assert measured["litert_lm_decode_tokens_per_s"] > 0 and measured["litert_lm_time_to_first_token_ms"] > 0
        assert measured["litert_lm_peak_rss_mb"] > 0
    # the runtime computes what the interpreter computes, token for token
    for recipe in ("float", "dynamic_int8"):
        measured = metadata(instance, "evaluation", f"{DEMO_MODEL}|{recipe}")
        assert measured["litert_lm_interpreter_agreement"] == 1.0, recipe
    assert metadata(instance, "evaluation", f"{DEMO_MODEL}|float")["litert_lm_float_agreement"] == 1.0


def test_every_recipe_answers_the_demo_tasks_in_litert_lm(golden, golden_instance):
    """Every bundle takes the demo's two tasks through lm-eval, each score with its standard error; the float
    model reads its held-out prose well above chance (1 in 4 choices), so the scoring is not noise."""
    for recipe in golden.recipes:
        measured = metadata(golden_instance, "evaluation", f"{DEMO_MODEL}|{recipe}")
        assert measured["tasks_error"] == "", recipe
        for score in ("task_demo_cloze_acc", "task_demo_completion_exact_match"):
            assert 0 <= measured[score] <= 1 and measured[f"{score}_error"] > 0, (recipe, score)
    float_model = metadata(golden_instance, "evaluation", f"{DEMO_MODEL}|float")
    assert float_model["task_demo_cloze_acc"] - 0.25 > 3 * float_model["task_demo_cloze_acc_error"]
    assert float_model["task_demo_completion_exact_match"] > 2 * float_model["task_demo_completion_exact_match_error"]
    # The float .tflite bundled once per checkpoint (float_baseline) is what every recipe is gated against; the float
    # recipe's bundle holds the same file, so it generates the same, and its tasks are the baseline's (not answered
    # twice: weights.TfliteModel.same_bytes_as).
    baseline = metadata(golden_instance, "float_baseline", DEMO_MODEL)
    for score in ("task_demo_cloze_acc", "task_demo_completion_exact_match"):
        assert baseline[f"float_{score}"] == float_model[f"float_{score}"] == float_model[score], score
    for health in ("repeated_ngram_share", "distinct_token_ratio", "early_stops", "mean_tokens"):
        assert baseline[f"float_{health}"] == float_model[f"litert_lm_{health}"], health
    assert baseline["float_mean_tokens"] == 128 - 32 - 1  # as long as the KV cache allows: the demo never stops


def test_the_bundle_is_published_beside_the_model_with_its_hash(golden):
    recipe_dir = golden.pipeline.store / DEMO_MODEL / "dynamic_int8"
    version = recipe_dir / json.loads((recipe_dir / "latest.json").read_text())["version"]
    manifest = json.loads((version / MANIFEST).read_text())
    assert manifest["bundle_sha256"] == hashlib.sha256((version / BUNDLE_FILE).read_bytes()).hexdigest()
    assert manifest["bundle_builder"].startswith("litert-lm-builder==")
    assert manifest["metrics"]["litert_lm_decode_tokens_per_s"] > 0  # the runtime's numbers are in it too


def test_each_version_has_a_model_card_a_hub_reads(golden):
    """README.md beside the manifest: Hugging Face's YAML metadata, then what the file is, the recipe in words and
    the measured numbers as the manifest has them; its sha256 in the manifest."""
    recipe_dir = golden.pipeline.store / DEMO_MODEL / "dynamic_int4_block32"
    version = recipe_dir / json.loads((recipe_dir / "latest.json").read_text())["version"]
    manifest, card = json.loads((version / MANIFEST).read_text()), (version / "README.md").read_text()
    assert manifest["model_card_sha256"] == hashlib.sha256(card.encode()).hexdigest()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["library_name"] == "litert-lm" and "dynamic_int4_block32" in front_matter["tags"]
    assert "license" not in front_matter  # the demo checkpoint declares none
    metrics = manifest["metrics"]
    assert "int4 weights scaled in blocks of 32, integer compute" in card
    assert (
        f"| perplexity / float | {metrics['perplexity_ratio']:.4f} ± {metrics['perplexity_ratio_error']:.4f} |" in card
    )
    cloze, reference = metrics["task_demo_cloze_acc"], metrics["float_task_demo_cloze_acc"]
    assert f"| {100 * (cloze - reference):+.1f} |" in card
    assert f"{metrics['litert_lm_decode_tokens_per_s']:.0f} tokens/s" in card


@pytest.fixture(scope="module")
def demo_float(demo_export, tmp_path_factory):
    """The demo's float .tflite, alone in a folder of this module's."""
    tflite = demo_export[1]
    folder = tmp_path_factory.mktemp("bundle")
    return shutil.copy(tflite, folder / "model.tflite")


@pytest.fixture(scope="module")
def demo_float_bundle(demo_export, demo_checkpoint_dir, tmp_path_factory):
    """The demo's float .tflite bundled, in a folder of its own."""
    tflite = shutil.copy(demo_export[1], tmp_path_factory.mktemp("float-bundle") / "model.tflite")
    spec = bundle_spec(demo_checkpoint_dir, json.loads((demo_checkpoint_dir / "config.json").read_text()), 128)
    return build_bundle(tflite, spec, GENERATIVE_API, bundle_path(tflite))


def test_task_scoring_sees_the_context_the_float_model_sees(demo_float_bundle, demo_checkpoint_dir, tmp_path):
    """What task accuracy rests on (evaluate/tasks.py). LiteRT-LM 0.18's text scoring after a prefill scores as if
    the prefill's second-to-last token were not there (google-ai-edge/LiteRT-LM#3561): pinned here, so that a
    runtime that fixes it fails this test and the workaround goes. With the workaround, the harness's score is the
    sum of the continuation's natural-log probabilities under the float PyTorch model, to 1e-3 (the demo has no
    start token; its tokens are its bytes)."""
    import litert_lm
    import torch
    from transformers import AutoModelForCausalLM

    from edge_quant_pipeline.evaluate.tasks import _harness_class

    model = AutoModelForCausalLM.from_pretrained(demo_checkpoint_dir, dtype=torch.float32)

    def float_score(context: str, continuation: str) -> float:
        ids = torch.tensor([list((context + continuation).encode())])
        with torch.no_grad():
            log_p = model(ids).logits[0].double().log_softmax(-1)
        return sum(float(log_p[i - 1, ids[0, i]]) for i in range(len(context), ids.shape[1]))

    context, continuation = "The baker stood at the door of his shop and", " listened"
    request = type("Request", (), {"args": (context, continuation)})
    with litert_lm.Engine(
        str(demo_float_bundle), backend=litert_lm.Backend.CPU(), max_num_tokens=128, cache_dir=str(tmp_path)
    ) as engine:
        with engine.create_session(apply_prompt_template=False) as session:
            session.run_prefill([context])
            raw = session.run_text_scoring([continuation]).scores[0]
        ((scored, _),) = _harness_class()(engine, 128).loglikelihood([request])
    assert raw == pytest.approx(float_score(context[:-2] + context[-1], continuation), abs=1e-3)  # the bug
    assert scored == pytest.approx(float_score(context, continuation), abs=1e-3)


def _tasks_run(bundle, names: list[str], limit: int):
    """The bundle's run with ``names`` answered after its generations, as the evaluation runs it."""
    text = DEFAULT_EVAL_TEXT.read_text()[: SETTINGS.prefill_len]
    return run_bundle(bundle, [text], 4, BundleRequest(tasks=TaskRequest(tuple(names), limit)), 128)


def test_a_local_task_folder_scores_as_the_demo_task_it_copies(demo_float_bundle, tmp_path):
    """A task of the user's own (YAML + JSONL in a folder, as lm-eval allows) through the same path as the demo's."""
    folder = tmp_path / "my-tasks"
    folder.mkdir()
    data = shutil.copy(DEMO_TASK_FILES["demo_cloze"], folder / "cloze.jsonl")
    (folder / "my_cloze.yaml").write_text(
        "task: my_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    scores = {score.task: score for score in _tasks_run(demo_float_bundle, [str(folder), "demo_cloze"], 12).tasks}
    mine, demo = scores["my_cloze"], scores["demo_cloze"]
    assert (mine.task, mine.metric, mine.samples) == ("my_cloze", "acc", 12)
    assert (mine.value, mine.stderr) == (demo.value, demo.stderr) and mine.stderr > 0


def test_task_runs_log_their_progress_and_time_each_task(demo_float_bundle, caplog):
    """A task run at real size takes minutes: the step's log says how far each task got, and each score carries
    the time its task took in the runtime. The generations come first and tell the parent they are done (its
    timed measurement ends there)."""
    done = []
    request = BundleRequest(
        tasks=TaskRequest(("demo_cloze", "demo_completion"), 6), on_generated=lambda: done.append(1)
    )
    with caplog.at_level(logging.INFO, logger="edge_quant_pipeline.evaluate.litert_lm"):
        run = run_bundle(demo_float_bundle, [DEFAULT_EVAL_TEXT.read_text()[:32]], 4, request, 128)
    progress = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("demo_cloze: 0 of 24 requests") for line in progress)  # 4 choices each
    assert any(line.startswith("demo_cloze: 24 of 24 requests") for line in progress)
    assert all(line.endswith(f"s ({demo_float_bundle.name})") for line in progress)
    assert any(line.startswith("demo_completion: 6 of 6 requests") for line in progress)
    cloze, completion = run.tasks
    assert (cloze.task, completion.task) == ("demo_cloze", "demo_completion") and run.tasks_error == ""
    assert cloze.seconds > 0 and completion.seconds > 0 and cloze.seconds != completion.seconds
    assert done == [1] and run.texts[0]


def test_a_task_that_cannot_run_costs_the_tasks_only(demo_float_bundle):
    """The bundle's generations stand, and the reason names the tasks and the bundle."""
    run = _tasks_run(demo_float_bundle, ["no_such_task_anywhere"], 2)
    assert run.texts[0] and run.tasks == ()
    assert run.tasks_error.startswith(f"tasks no_such_task_anywhere on {demo_float_bundle}: ")
    assert "no_such_task_anywhere" in run.tasks_error.partition(": ")[2]


def test_litert_lm_generates_what_the_interpreter_generates(demo_float, demo_checkpoint_dir):
    spec = bundle_spec(demo_checkpoint_dir, json.loads((demo_checkpoint_dir / "config.json").read_text()), 128)
    assert spec.stop_token_ids == (10,) and spec.start_token_id is None  # a newline ends a reply
    bundle = build_bundle(demo_float, spec, GENERATIVE_API, bundle_path(demo_float))
    text = DEFAULT_EVAL_TEXT.read_text()[: SETTINGS.prefill_len]
    run = run_bundle(bundle, [text, text[1:]], 12)
    with InterpreterSession(demo_float, SETTINGS, num_threads=2) as session:
        expected = session.greedy(np.frombuffer(text.encode(), np.uint8).astype(np.int32), 12)
    generated = list(run.texts[0].encode())  # the demo's tokens are its bytes
    assert generated == expected.tolist()[: len(generated)] and len(generated) > 0
    assert run.prompt_tokens == SETTINGS.prefill_len and len(run.texts) == 2 and run.texts[1]
    # the runtime's XNNPACK cache (as large as the packed weights) does not outlive the run
    assert {p.name for p in demo_float.parent.iterdir()} == {"model.tflite", "model.litertlm"}


def test_a_bundle_without_executor_metadata_is_caught(tmp_path, demo_float, demo_checkpoint_dir):
    """LiteRT-LM loads it without a word, then reads the context length from the wrong axis of the KV cache."""
    spec = bundle_spec(demo_checkpoint_dir, json.loads((demo_checkpoint_dir / "config.json").read_text()), 128)
    bundle = build_bundle(demo_float, spec, GENERATIVE_API, tmp_path / "no-metadata.litertlm", False)
    with pytest.raises(BundleRejectedError, match="Input token ids are too long"):
        run_bundle(bundle, [DEFAULT_EVAL_TEXT.read_text()[:32]], 8)


def test_a_chat_template_is_rendered_by_the_runtime_and_one_it_cannot_render_is_reported(
    tmp_path, demo_float, demo_checkpoint_dir
):
    """A bundle with a chat template holds a two-turn conversation through LiteRT-LM's Conversation API (the
    runtime renders the template, as for an app); a template that raises is reported with the runtime's message."""
    folder = shutil.copytree(demo_checkpoint_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    bundle = build_bundle(demo_float, bundle_spec(folder, config, 128), GENERATIVE_API, tmp_path / "chat.litertlm")
    run = run_bundle(bundle, [DEFAULT_EVAL_TEXT.read_text()[:32]], 8, BundleRequest(chat=True))
    assert len(run.chat_replies) == 2 and all(run.chat_replies)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('a system message must come first') }}")
    bundle = build_bundle(demo_float, bundle_spec(folder, config, 128), GENERATIVE_API, tmp_path / "bad.litertlm")
    with pytest.raises(BundleRejectedError, match="Conversation API failed .* a system message must come first"):
        run_bundle(bundle, [DEFAULT_EVAL_TEXT.read_text()[:32]], 8, BundleRequest(chat=True))


def test_a_checkpoint_without_what_a_bundle_needs_is_refused_with_the_file_to_fix(tmp_path, demo_checkpoint_dir):
    folder = shutil.copytree(demo_checkpoint_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "generation_config.json").write_text("{}")
    with pytest.raises(BundleError, match=r"generation_config\.json: no eos_token_id"):
        bundle_spec(folder, config, 128)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        bundle_spec(folder, config, 128)


def test_a_bundle_the_disk_cannot_hold_is_refused_before_it_is_written(tmp_path, demo_checkpoint_dir):
    """Gemma 4 E2B's float bundle is 20 GB: packed into a disk without room, it filled it; now the step is refused
    with both sizes and the setting that points elsewhere (a sparse model file larger than the disk stands in)."""
    config = json.loads((demo_checkpoint_dir / "config.json").read_text())
    spec = bundle_spec(demo_checkpoint_dir, config, 128)
    tflite = tmp_path / "float.tflite"
    with tflite.open("wb") as stream:
        stream.truncate(shutil.disk_usage(tmp_path).free + (1 << 30))
    refusal = r"this step writes about .* GB and the disk has .* set EDGE_QUANT_WORK_DIR"
    with pytest.raises(NotEnoughDiskError, match=refusal):
        build_bundle(tflite, spec, GENERATIVE_API, bundle_path(tflite))
    assert not bundle_path(tflite).exists() and list(tmp_path.iterdir()) == [tflite]
