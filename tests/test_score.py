"""Pseudo-log-likelihood: parity with transformers on the same checkpoint, word-l2r against
plain PLL position by position, independence of the model's mode and of the chunking, bad
input, and the command line."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minibert.checkpoint import read_checkpoint
from minibert.errors import MinibertError
from minibert.score import format_results, main, pseudo_log_likelihood, score_sentences
from minibert.tokenizer import load_tokenizer

from conftest import BERT_TINY, MINILM, call_main

# Lengths differ (chunks mix sentences, so rows are padded); several words split into 2-4
# pieces, punctuation, digits, an apostrophe.
SENTENCES = ("The keys to the cabinet are on the table.",
             "The ichthyologist studied an unidentifiable photosynthesizing organism.",
             "It's what I don't understand, isn't it?",
             "Paris hosted the Olympics in 1924 and 2024.",
             "Go!")
# A token's log-probability is a float32 of magnitude up to ~20 (one ulp: 1.9e-6). Another
# implementation (transformers) or another padding of the same rows (a different batch split)
# rounds it a few ulps differently: measured up to 6.7e-6. A PLL sums up to ~20 of them
# (in float64), so its difference grows with its size: measured up to 1e-7 of |PLL|.
TOKEN_TOLERANCE = 1e-4  # absolute, per token: ~50 ulps at 20
PLL_RELATIVE = 1e-6  # per sentence, relative to |PLL| (never below TOKEN_TOLERANCE)


def same_pll(got: float, expected: float) -> bool:
    return got == pytest.approx(expected, rel=PLL_RELATIVE, abs=TOKEN_TOLERANCE)


@pytest.fixture(scope="module")
def model():
    return read_checkpoint(BERT_TINY)[0]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BERT_TINY)


@pytest.fixture(scope="module")
def reference():
    """transformers' BertForMaskedLM and fast tokenizer on the same folder."""
    from transformers import BertForMaskedLM, BertTokenizerFast
    return (BertForMaskedLM.from_pretrained(BERT_TINY).eval(),
            BertTokenizerFast.from_pretrained(BERT_TINY))


@torch.inference_mode()
def reference_logprobs(reference, text: str, word_l2r: bool) -> tuple[list[int], list[float]]:
    """PLL written with transformers: one forward pass per token, the whole sentence but that
    token (and, for word-l2r, the later pieces of its word, by the tokenizer's word_ids)."""
    hf_model, hf_tokenizer = reference
    encoding = hf_tokenizer(text)
    ids, words = encoding["input_ids"], encoding.word_ids()
    logprobs = []
    for position in range(1, len(ids) - 1):
        masked = list(ids)
        for other in range(position, len(ids) - 1):
            if other == position or (word_l2r and words[other] == words[position]):
                masked[other] = hf_tokenizer.mask_token_id
        logits = hf_model(input_ids=torch.tensor([masked])).logits[0, position]
        logprobs.append(float(logits.log_softmax(-1)[ids[position]]))
    return ids[1:-1], logprobs


@pytest.mark.parametrize("word_l2r", [False, True], ids=["pll", "word-l2r"])
def test_matches_transformers(model, tokenizer, reference, word_l2r):
    # batch_size 7: chunks straddle sentences of different lengths.
    results = score_sentences(model, tokenizer, SENTENCES, word_l2r=word_l2r, batch_size=7)
    worst_token, worst_pll = 0.0, 0.0
    for text, result in zip(SENTENCES, results):
        ids, expected = reference_logprobs(reference, text, word_l2r)
        assert [t["token_id"] for t in result["tokens"]] == ids
        got = [t["logprob"] for t in result["tokens"]]
        worst_token = max(worst_token, max(abs(a - b) for a, b in zip(got, expected)))
        worst_pll = max(worst_pll, abs(result["pll"] - sum(expected)) / abs(sum(expected)))
        assert same_pll(result["pll"], sum(expected)), text
    print(f"word_l2r={word_l2r}: largest difference from transformers per token "
          f"{worst_token:.3g}, per sentence PLL {worst_pll:.3g} of |PLL|")
    assert worst_token < TOKEN_TOLERANCE


def test_word_l2r_differs_exactly_on_pieces_followed_by_their_word(model, tokenizer, reference):
    plain = score_sentences(model, tokenizer, SENTENCES)
    l2r = score_sentences(model, tokenizer, SENTENCES, word_l2r=True)
    changed = 0
    for text, a, b in zip(SENTENCES, plain, l2r):
        words = reference[1](text).word_ids()[1:-1]  # word of each token, by transformers
        for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
            followed = i + 1 < len(words) and words[i + 1] == words[i]
            if followed:  # more of the word is hidden: a different probability
                assert abs(x["logprob"] - y["logprob"]) > TOKEN_TOLERANCE, (text, x["token"])
                changed += 1
            else:  # the same masked input as plain PLL: the same number
                assert x["logprob"] == y["logprob"], (text, x["token"])
    assert changed >= 6  # the sentences do hold multi-piece words
    assert [t["token"] for t in plain[1]["tokens"]][:4] == ["the", "ich", "##thy", "##ologist"]


def test_independent_of_the_model_mode_and_restores_it(model, tokenizer):
    expected = pseudo_log_likelihood(model, tokenizer, SENTENCES[0])
    model.train()
    try:
        ids = torch.tensor([tokenizer.encode(SENTENCES[0]).ids])
        assert not torch.equal(model(ids), model(ids))  # dropout is live in train mode
        assert pseudo_log_likelihood(model, tokenizer, SENTENCES[0]) == expected
        assert model.training  # the caller's mode is back
    finally:
        model.eval()
    pseudo_log_likelihood(model, tokenizer, SENTENCES[0])
    assert not model.training


def test_chunk_size_does_not_change_the_scores(model, tokenizer):
    one = score_sentences(model, tokenizer, SENTENCES, batch_size=1)
    many = score_sentences(model, tokenizer, SENTENCES, batch_size=1000)
    for a, b in zip(one, many):
        assert same_pll(a["pll"], b["pll"])  # another padding: float32 rounding only


def test_result_fields(model, tokenizer):
    result = pseudo_log_likelihood(model, tokenizer, SENTENCES[0])
    assert list(result) == ["text", "pll", "pseudo_perplexity", "tokens"]
    assert list(result["tokens"][0]) == ["token", "token_id", "logprob"]
    assert len(result["tokens"]) == 10  # no [CLS], no [SEP]
    assert result["pll"] == sum(t["logprob"] for t in result["tokens"])  # the same sum
    assert result["pseudo_perplexity"] == math.exp(-result["pll"] / 10)
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("text, kwargs, message", [
    ("word " * 600, {}, "602 tokens in 'word word word word word word ...', but the model has "
                        "only 512 positions"),
    ("   ", {}, "nothing to score"),
    ("A sentence.", {"batch_size": 0}, "batch_size must be >= 1"),
])
def test_bad_input_raises(model, tokenizer, text, kwargs, message):
    with pytest.raises(MinibertError) as error:
        pseudo_log_likelihood(model, tokenizer, text, **kwargs)
    assert str(error.value) == message or message in str(error.value)


def test_special_token_text_is_scored_as_unknown(model, tokenizer):
    result = pseudo_log_likelihood(model, tokenizer, "One [SEP] two [MASK].")
    assert [t["token"] for t in result["tokens"]] == ["one", "[UNK]", "two", "[UNK]", "."]


# ---------------------------------------------------------------------------------------------
# command line


run_main = functools.partial(call_main, main)  # the command in this process


def test_cli_plain_output_ranks_best_first(monkeypatch, capsys, model, tokenizer):
    status, stdout, _ = run_main(monkeypatch, capsys, "--model", str(BERT_TINY), *SENTENCES)
    assert status == 0
    assert stdout == format_results(score_sentences(model, tokenizer, SENTENCES)) + "\n"
    lines = stdout.splitlines()
    assert lines[0].split() == ["PLL", "pseudo-PPL", "tokens", "sentence"]
    plls = [float(line.split()[0]) for line in lines[1:]]
    assert plls == sorted(plls, reverse=True) and len(plls) == len(SENTENCES)
    assert sorted(line.split(None, 3)[3] for line in lines[1:]) == sorted(SENTENCES)


def test_cli_json_from_file_in_input_order(monkeypatch, capsys, model, tokenizer, tmp_path):
    file = tmp_path / "sentences.txt"
    file.write_text(f"{SENTENCES[1]}\n\n{SENTENCES[2]}\n", encoding="utf-8")
    status, stdout, _ = run_main(monkeypatch, capsys, "--model", str(BERT_TINY), SENTENCES[0],
                                 "--file", str(file), "--word-l2r", "--json", "--batch_size", "5")
    assert status == 0
    objects = [json.loads(line) for line in stdout.splitlines()]
    expected = score_sentences(model, tokenizer, SENTENCES[:3], word_l2r=True)
    assert [o["text"] for o in objects] == list(SENTENCES[:3])
    for got, want in zip(objects, expected):
        assert list(got) == ["text", "metric", "pll", "pseudo_perplexity", "tokens"]
        assert same_pll(got["pll"], want["pll"])  # batch_size 5 against 32: rounding only


def test_bad_sentences_are_reported_and_the_others_scored(monkeypatch, capsys, model, tokenizer,
                                                          tmp_path):
    # As fill-mask: each sentence that cannot be scored is named (FILE:LINE, argument N) on
    # stderr and in --json as an error object; the others are scored; the status is 1.
    file = tmp_path / "sentences.txt"
    file.write_text(f"{SENTENCES[0]}\n\n" + "word " * 600 + f"\n{SENTENCES[4]}\n",
                    encoding="utf-8")
    expected = score_sentences(model, tokenizer, [SENTENCES[2], SENTENCES[0], SENTENCES[4]])
    for output in ("plain", "json"):
        status, stdout, stderr = run_main(
            monkeypatch, capsys, "--model", str(BERT_TINY), SENTENCES[2], "   ", "--file",
            str(file), *(["--json"] if output == "json" else []))
        assert status == 1
        assert stderr.splitlines() == [
            "error: argument 2: nothing to score in '   ': it has no tokens",
            f"error: {file}:3: 602 tokens in 'word word word word word word ...', but the model "
            f"has only 512 positions"]
        if output == "plain":
            assert stdout == format_results(expected) + "\n"
            continue
        objects = [json.loads(line) for line in stdout.splitlines()]
        assert [o["text"] for o in objects] == [SENTENCES[2], "   ", SENTENCES[0],
                                                "word " * 599 + "word", SENTENCES[4]]
        for got, want in zip([objects[0], objects[2], objects[4]], expected):
            assert same_pll(got["pll"], want["pll"])
        assert objects[1] == {"text": "   ", "error": {
            "source": "argument 2", "message": "nothing to score in '   ': it has no tokens"}}
        assert objects[3]["error"]["source"] == f"{file}:3" and "pll" not in objects[3]


@pytest.mark.parametrize("word_l2r, name", [(False, "PLL"), (True, "PLL-word-l2r")])
def test_the_score_shown_is_named(monkeypatch, capsys, word_l2r, name):
    flags = ["--word-l2r"] if word_l2r else []
    status, stdout, _ = run_main(monkeypatch, capsys, "--model", str(BERT_TINY), *flags, "Go!")
    assert status == 0 and stdout.splitlines()[0].split()[0] == name
    status, stdout, _ = run_main(monkeypatch, capsys, "--model", str(BERT_TINY), *flags, "--json",
                                 "Go!")
    assert status == 0 and json.loads(stdout)["metric"] == name

BAD_INPUTS = {  # message expected on stderr: command-line arguments
    "only 512 positions": ["--model", str(BERT_TINY), "word " * 600],
    "has no masked-LM head": ["--model", str(MINILM), "A sentence."],
    "no such folder": ["--model", "/nonexistent/model", "A sentence."],
    "no sentence to score": ["--model", str(BERT_TINY)],
    "cannot read sentences": ["--model", str(BERT_TINY), "--file", "/nonexistent/sentences.txt"],
    "batch_size must be >= 1": ["--model", str(BERT_TINY), "--batch_size", "0", "A sentence."],
}


@pytest.mark.parametrize("message, args", BAD_INPUTS.items(), ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_error(monkeypatch, capsys, message, args):
    status, stdout, stderr = run_main(monkeypatch, capsys, *args)
    assert status == 1 and stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr


def test_cli_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "minibert.score", "--model", str(BERT_TINY),
                             "--json", "Go!"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == "Go!"
    help_text = subprocess.run([sys.executable, "-m", "minibert.score", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    for flag in ("--model", "--file", "--word-l2r", "--json", "--batch_size", "Salazar"):
        assert flag in help_text


def test_console_script():
    script = Path(sys.executable).parent / "minibert-score"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . creates it)")
    result = subprocess.run([str(script), "--model", "/nonexistent/model", "Go!"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "error: /nonexistent/model: no such folder\n"
