"""Fill-mask: parity with transformers on a real BertForMaskedLM, bad input, and the command line.

The reference is transformers' BertForMaskedLM on the same checkpoint folder, with the softmax
over the mask position's logits, and for several masks the same one-mask-at-a-time procedure
written here with transformers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minibert.checkpoint import read_checkpoint, save_pretrained
from minibert.errors import MinibertError
from minibert.fill_mask import EXAMPLE_SENTENCES, fill_mask, fill_masks, format_result, main
from minibert.tokenizer import load_tokenizer

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
CHECKPOINT = ASSETS / "checkpoints" / "bert-tiny-splade-mlm"
SINGLE_MASK = ("Learning a new language can be [MASK] but rewarding.",
               "The capital of France is [MASK].", "It's what I don't [MASK], isn't it?")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    return read_checkpoint(CHECKPOINT)[0]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CHECKPOINT)


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer on the same folder."""
    from transformers import BertForMaskedLM, BertTokenizer
    return (BertForMaskedLM.from_pretrained(CHECKPOINT).eval(),
            BertTokenizer.from_pretrained(CHECKPOINT))


@torch.inference_mode()
def reference_fill(reference, text: str, top_k: int, order: str) -> dict:
    """fill_mask's procedure written with transformers: one full forward pass per mask."""
    hf_model, hf_tokenizer = reference
    ids = hf_tokenizer(text)["input_ids"]
    masks = [i for i, t in enumerate(ids) if t == hf_tokenizer.mask_token_id]
    filled = []  # {"position", "token", "score"} in the order filled
    while True:
        logits = hf_model(input_ids=torch.tensor([ids])).logits[0]  # (seq, vocab)
        probs = logits[masks].softmax(dim=-1)  # (remaining masks, vocab)
        if len(masks) == 1:
            scores, token_ids = probs[0].topk(top_k)
            filled.append({"position": masks[0], "score": float(scores[0]),
                           "token": hf_tokenizer.convert_ids_to_tokens(int(token_ids[0]))})
            sequences = [hf_tokenizer.decode(ids[:masks[0]] + [t] + ids[masks[0] + 1:],
                                             skip_special_tokens=True) for t in token_ids.tolist()]
            return {"token_ids": token_ids.tolist(), "scores": scores, "sequences": sequences,
                    "tokens": hf_tokenizer.convert_ids_to_tokens(token_ids.tolist()),
                    "filled": filled}
        best_scores, best_ids = probs.max(dim=-1)
        pick = 0 if order == "left-to-right" else int(best_scores.argmax())
        ids[masks[pick]] = int(best_ids[pick])
        filled.append({"position": masks.pop(pick), "score": float(best_scores[pick]),
                       "token": hf_tokenizer.convert_ids_to_tokens(int(best_ids[pick]))})


def assert_matches_reference(result: dict, expected: dict) -> None:
    predictions = result["predictions"]
    assert [p["token_id"] for p in predictions] == expected["token_ids"]
    assert [p["token"] for p in predictions] == expected["tokens"]
    assert [p["sequence"] for p in predictions] == expected["sequences"]
    scores = torch.tensor([p["score"] for p in predictions])
    assert (scores - expected["scores"]).abs().max() < TOLERANCE
    assert [(f["position"], f["token"]) for f in result["filled"]] == [
        (f["position"], f["token"]) for f in expected["filled"]]
    for got, want in zip(result["filled"], expected["filled"]):
        assert abs(got["score"] - want["score"]) < TOLERANCE


@pytest.mark.parametrize("text", SINGLE_MASK)
def test_single_mask_matches_transformers(model, tokenizer, reference, text):
    result = fill_mask(model, tokenizer, text, top_k=10)
    assert result["input"] == text
    assert_matches_reference(result, reference_fill(reference, text, 10, "left-to-right"))


@pytest.mark.parametrize("order", ["left-to-right", "confidence"])
def test_several_masks_match_transformers(model, tokenizer, reference, order):
    # One padded batch of sentences of different lengths and mask counts, against one sentence
    # at a time in transformers: padding must not change any answer.
    results = fill_masks(model, tokenizer, EXAMPLE_SENTENCES + SINGLE_MASK, top_k=5, order=order)
    for text, result in zip(EXAMPLE_SENTENCES + SINGLE_MASK, results):
        assert_matches_reference(result, reference_fill(reference, text, 5, order))


def test_confidence_order_is_not_left_to_right(model, tokenizer):
    # Otherwise the parity test of the confidence order above would prove nothing new.
    text = "[MASK] [MASK] [MASK] [MASK] [MASK] [MASK]!"
    left_to_right = fill_mask(model, tokenizer, text)
    confidence = fill_mask(model, tokenizer, text, order="confidence")
    assert [f["position"] for f in left_to_right["filled"]] == [1, 2, 3, 4, 5, 6]
    assert sorted(f["position"] for f in confidence["filled"]) == [1, 2, 3, 4, 5, 6]
    assert [f["position"] for f in confidence["filled"]] != [1, 2, 3, 4, 5, 6]


def test_lower_case_mask_and_plain_data(model, tokenizer):
    upper = fill_mask(model, tokenizer, "Paris is the [MASK] [MASK] of France.")
    lower = fill_mask(model, tokenizer, "Paris is the [mask] [Mask] of France.")
    assert lower["input"] == "Paris is the [mask] [Mask] of France."
    assert lower["predictions"] == upper["predictions"]
    assert lower["filled"] == upper["filled"]
    assert json.loads(json.dumps(upper)) == upper  # plain data, nothing to convert
    assert list(upper) == ["input", "predictions", "filled"]
    assert list(upper["predictions"][0]) == ["token", "token_id", "score", "sequence"]
    assert list(upper["filled"][0]) == ["position", "token", "score"]


@pytest.mark.parametrize("text, kwargs, message", [
    ("No mask here.", {}, "no [MASK]"),
    ("[MASK] " + "word " * 600, {}, "512 positions"),
    ("A [MASK].", {"top_k": 0}, "top_k must be between 1"),
    ("A [MASK].", {"top_k": 30523}, "top_k must be between 1"),
    ("A [MASK].", {"order": "random"}, "order must be one of"),
])
def test_bad_input_raises(model, tokenizer, text, kwargs, message):
    with pytest.raises(MinibertError, match=re.escape(message)):
        fill_mask(model, tokenizer, text, **kwargs)


def cli(*args: str, command: tuple[str, ...] = (sys.executable, "-m", "minibert.fill_mask"),
        ) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


def test_cli_plain_output(model, tokenizer):
    texts = ["Learning a new language can be [mask] but rewarding.", "The man worked as a [MASK]."]
    run = cli("--model", str(CHECKPOINT), "--top-k", "3", *texts)
    assert run.returncode == 0, run.stderr
    expected = fill_masks(model, tokenizer, texts, top_k=3)
    assert run.stdout == "\n\n".join(format_result(r) for r in expected) + "\n"
    lines = run.stdout.splitlines()
    assert lines[0] == f"Input sentence: {texts[0]}"
    assert lines[1] == "Top 3 predictions:"
    assert lines[2].startswith("  Token: '") and " | Score: 0." in lines[2]
    assert lines[2].endswith(" but rewarding.'")


def test_plain_output_names_one_prediction_in_the_singular(model, tokenizer):
    one, two_masks = fill_masks(model, tokenizer, ["The capital of France is [MASK].",
                                                   "Paris is the [MASK] [MASK] of France."],
                                top_k=1)
    assert format_result(one).splitlines()[1] == "Top prediction:"
    assert (format_result(two_masks).splitlines()[3]
            == "Top prediction for the last mask (position 5):")


def test_cli_json_from_file_and_examples(model, tokenizer, tmp_path):
    file = tmp_path / "sentences.txt"
    file.write_text("The capital of France is [MASK].\n\nI [MASK] to the store.\n")
    run = cli("--model", str(CHECKPOINT), "--file", str(file), "--examples", "--json",
              "--order", "confidence")
    assert run.returncode == 0, run.stderr
    texts = ["The capital of France is [MASK].", "I [MASK] to the store.", *EXAMPLE_SENTENCES]
    objects = [json.loads(line) for line in run.stdout.splitlines()]
    expected = fill_masks(model, tokenizer, texts, order="confidence")
    assert [o["input"] for o in objects] == texts
    for got, want in zip(objects, expected):
        assert [p["token_id"] for p in got["predictions"]] == [
            p["token_id"] for p in want["predictions"]]
        assert [(f["position"], f["token"]) for f in got["filled"]] == [
            (f["position"], f["token"]) for f in want["filled"]]


def test_cli_reads_a_minibert_folder(model, tokenizer, tmp_path, monkeypatch, capsys):
    folder = save_pretrained(model, tmp_path / "bert-tiny", tokenizer_source=CHECKPOINT)
    text = "The capital of France is [MASK]."
    monkeypatch.setattr(sys, "argv", ["minibert-fill-mask", "--model", str(folder), "--json", text])
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert exit_status.value.code == 0
    assert json.loads(capsys.readouterr().out) == fill_mask(model, tokenizer, text)


def test_cli_help():
    run = cli("--help")
    assert run.returncode == 0
    for flag in ("--model", "--top-k", "--order", "--json", "--file", "--examples"):
        assert flag in run.stdout


BAD_INPUTS = {  # message expected on stderr: command-line arguments
    "no [MASK]": ["--model", str(CHECKPOINT), "No mask here."],
    "only 512 positions": ["--model", str(CHECKPOINT), "[MASK] " + "word " * 600],
    "no such folder": ["--model", str(CHECKPOINT / "missing"), "A [MASK]."],
    "top_k must be between 1 and the vocabulary size (30522), got 0":
        ["--model", str(CHECKPOINT), "--top-k", "0", "A [MASK]."],
    "top_k must be between 1 and the vocabulary size (30522), got 30523":
        ["--model", str(CHECKPOINT), "--top-k", "30523", "A [MASK]."],
    "cannot read sentences": ["--model", str(CHECKPOINT), "--file", "/nonexistent/sentences.txt"],
    "no sentence to fill": ["--model", str(CHECKPOINT)],
}


def assert_one_line_error(run: subprocess.CompletedProcess, message: str) -> None:
    assert run.returncode == 1, run.stderr
    assert run.stdout == ""
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert message in run.stderr


@pytest.mark.parametrize("message, args", BAD_INPUTS.items(), ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_error(monkeypatch, capsys, message, args):
    # In this process, through the same main() the command runs: starting a new interpreter
    # per case would import torch seven times (a minute of CI on a busy 2-core machine).
    monkeypatch.setattr(sys, "argv", ["minibert-fill-mask", *args])
    with pytest.raises(SystemExit) as exit_status:
        main()
    stdout, stderr = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(args, exit_status.value.code, stdout, stderr),
                          message)


def test_bad_input_in_a_real_process():
    assert_one_line_error(cli(*BAD_INPUTS["no [MASK]"]), "no [MASK]")


def test_console_script_bad_input():
    script = Path(sys.executable).parent / "minibert-fill-mask"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . creates it)")
    assert_one_line_error(cli(*BAD_INPUTS["no such folder"], command=(str(script),)),
                          "no such folder")


# ---------------------------------------------------------------------------------------------
# The caller's mode, typed special tokens, several masks shown, bad sentences, --truncate


def test_same_answer_in_train_mode_and_mode_left_as_it_was(model, tokenizer):
    texts = ["Paris is the [MASK] [MASK] of France.", "The capital of France is [MASK]."]
    expected = fill_masks(model, tokenizer, texts)
    assert not model.training
    model.train()  # dropout on, as a caller in the middle of training would leave it
    try:
        first, second = fill_masks(model, tokenizer, texts), fill_masks(model, tokenizer, texts)
        assert model.training
    finally:
        model.eval()
    assert first == second == expected
    fill_mask(model, tokenizer, texts[1])
    assert not model.training


def test_typed_special_tokens_are_read_as_unk_and_shown(model, tokenizer):
    unk = fill_mask(model, tokenizer, "Paris is the [MASK] of France. [UNK] It is big.")
    for typed in ("[SEP]", "[CLS]", "[PAD]"):
        result = fill_mask(model, tokenizer, f"Paris is the [MASK] of France. {typed} It is big.")
        assert result["predictions"] == unk["predictions"], typed
        assert result["filled"] == unk["filled"]
        assert all("[UNK] it is big." in p["sequence"] for p in result["predictions"])


def test_plain_output_shows_the_earlier_picks(model, tokenizer):
    result = fill_mask(model, tokenizer, "I [MASK] to the [MASK] yesterday to buy some [MASK].",
                       top_k=2, order="confidence")
    lines = format_result(result).splitlines()
    first, second, last = result["filled"]
    assert lines[1] == "Filled first, each with its most probable token:"
    for line, pick in zip(lines[2:4], (first, second)):
        assert line == f"  Position {pick['position']}: '{pick['token']}' | Score: {pick['score']:.4f}"
    assert lines[4] == f"Top 2 predictions for the last mask (position {last['position']}):"
    assert len(lines) == 7


def test_bad_sentences_are_reported_and_the_others_answered(model, tokenizer, tmp_path,
                                                             monkeypatch, capsys):
    file = tmp_path / "sentences.txt"
    file.write_text("The capital of France is [MASK].\n\nNo mask here.\n"
                    "[MASK] " + "word " * 600 + "\nI [MASK] to the store.\n")
    good = ["The capital of France is [MASK].", "I [MASK] to the store.", "A [MASK] day."]
    expected = fill_masks(model, tokenizer, good)
    for output in ("plain", "json"):
        argv = ["minibert-fill-mask", "--model", str(CHECKPOINT), "--file", str(file),
                "A [MASK] day.", "No mask either."] + (["--json"] if output == "json" else [])
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_status:
            main()
        assert exit_status.value.code == 1
        stdout, stderr = capsys.readouterr()
        assert stderr.splitlines() == [
            "error: argument 2: no [MASK] in 'No mask either.'",
            f"error: {file}:3: no [MASK] in 'No mask here.'",
            f"error: {file}:4: 603 tokens in '[MASK] word word word word wor...', but the model "
            f"has only 512 positions (--truncate keeps a window around the masks)"]
        if output == "plain":
            assert stdout == "\n\n".join(format_result(r) for r in
                                         [expected[2], expected[0], expected[1]]) + "\n"
            continue
        objects = [json.loads(line) for line in stdout.splitlines()]
        assert [o["input"] for o in objects] == ["A [MASK] day.", "No mask either.", good[0],
                                                 "No mask here.", "[MASK] " + "word " * 599 + "word",
                                                 good[1]]
        assert objects[0] == expected[2] and objects[2] == expected[0] and objects[5] == expected[1]
        assert objects[1]["error"] == {"source": "argument 2",
                                       "message": "no [MASK] in 'No mask either.'"}
        assert objects[3]["error"]["source"] == f"{file}:3"
        assert objects[4]["error"]["source"] == f"{file}:4" and "predictions" not in objects[4]


def test_truncate_keeps_the_window_around_the_masks(model, tokenizer):
    long = "word " * 300 + "[MASK] " + "word " * 300  # 603 tokens with [CLS] and [SEP]
    with pytest.raises(MinibertError, match="--truncate keeps a window"):
        fill_mask(model, tokenizer, long)
    result = fill_mask(model, tokenizer, long, truncate=True)
    # 510 word pieces fit between [CLS] and [SEP]: the mask (piece 300) and 255 pieces before.
    assert result["truncated"] == {"tokens": 603, "kept": [45, 555]}
    window = fill_mask(model, tokenizer, "word " * 255 + "[MASK]" + " word" * 254)
    assert result["predictions"] == window["predictions"]
    assert result["filled"] == window["filled"]
    assert format_result(result).splitlines()[1] == (
        "Truncated: kept word pieces 45-555 of 601, around the masks")
    # A mask near the start: the window starts at the text's start.
    start = fill_mask(model, tokenizer, "[MASK] big " + "word " * 600, truncate=True)
    assert start["truncated"]["kept"] == [0, 510]
    with pytest.raises(MinibertError, match="masks span 602 tokens"):
        fill_mask(model, tokenizer, "[MASK] " + "word " * 600 + "[MASK]", truncate=True)


def test_cli_truncate_and_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["minibert-fill-mask", "--model", str(CHECKPOINT),
                                      "--truncate", "--json", "word " * 600 + "[MASK]."])
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert exit_status.value.code == 0
    assert json.loads(capsys.readouterr().out)["truncated"] == {"tokens": 604, "kept": [92, 602]}
    help_text = cli("--help").stdout
    assert "--truncate" in help_text and "greedy" in help_text
    assert '"filled" lists every' in help_text
