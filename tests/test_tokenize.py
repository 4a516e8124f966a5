"""Eval text tokenization: the checkpoint's tokenizer.json when it has one, bytes otherwise."""

import numpy as np
import pytest

from edge_quant_pipeline.evaluate.reference import EvalTextError, eval_windows, tokenize


def test_byte_level_without_a_tokenizer(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("héllo")
    assert tokenize(text, tmp_path, vocab_size=256).tolist() == list("héllo".encode())


def test_tokenizer_json_is_used_when_present(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = tmp_path / "eval.txt"
    text.write_text("the river runs past the bakery and the river runs on")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(text)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ids = tokenize(text, tmp_path, vocab_size=tokenizer.get_vocab_size())
    assert len(ids) == 11 and ids.dtype == np.int32
    assert ids[0] == ids[4] == ids[7] == tokenizer.token_to_id("the")


def test_small_vocabulary_without_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "eval.txt").write_text("x")
    with pytest.raises(EvalTextError, match="no tokenizer.json, and a vocabulary of 100 is too small"):
        tokenize(tmp_path / "eval.txt", tmp_path, vocab_size=100)


def test_missing_eval_text_names_the_variable(tmp_path):
    with pytest.raises(EvalTextError, match="eval text does not exist. Set EDGE_QUANT_EVAL_TEXT"):
        tokenize(tmp_path / "missing.txt", tmp_path, vocab_size=256)


def test_text_shorter_than_one_window_names_the_file(tmp_path):
    with pytest.raises(EvalTextError, match="short.txt: 5 tokens .* needs at least 128"):
        eval_windows(np.arange(5), 128, 2048, tmp_path / "short.txt")
