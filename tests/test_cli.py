"""The command-line surface shared by every command (minibert/cli.py): --a-b and --a_b alike,
one spelling in --help, "did you mean" in the spelling typed, the name the command was
called by in its usage line."""

import configparser
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BERT_TINY, REPO
from minibert import evaluate, fill_mask, plot, score
from minibert.cli import ArgumentParser
from minibert.errors import MinibertError
from minibert.train_config import parse_config

sys.path.insert(0, str(REPO))
import convert_weights  # noqa: E402  (a script at the repository root)


def test_train_accepts_both_spellings():
    hyphens = parse_config(["--batch-size", "8", "--max-steps=3", "--eval_every", "5"])
    underscores = parse_config(["--batch_size", "8", "--max_steps=3", "--eval-every", "5"])
    assert hyphens == underscores
    assert (hyphens.batch_size, hyphens.max_steps, hyphens.eval_every) == (8, 3, 5)


def test_fill_mask_accepts_both_spellings():
    args = fill_mask.parse_args(["--model", "m", "--top_k", "3", "A [MASK]."])
    assert args.top_k == 3
    assert fill_mask.parse_args(["--model", "m", "--top-k", "3", "A [MASK]."]) == args


def test_convert_weights_accepts_both_spellings():
    assert convert_weights.parse_args(["a", "b", "--to_hf"]).to_hf
    assert convert_weights.parse_args(["a", "b", "--to-hf"]).to_hf


def test_evaluate_and_score_accept_both_spellings():
    hyphens = evaluate.parse_args(["--model", "m", "--data", "d", "--max-seq-length", "64",
                                   "--eval-seed", "3", "--whole-word-mask"])
    underscores = evaluate.parse_args(["--model", "m", "--data", "d", "--max_seq_length", "64",
                                       "--eval_seed", "3", "--whole_word_mask"])
    assert hyphens == underscores
    assert (hyphens.max_seq_length, hyphens.eval_seed, hyphens.whole_word_mask) == (64, 3, True)
    assert score.parse_args(["--model", "m", "--word_l2r", "--batch-size", "4", "A b."]) == \
        score.parse_args(["--model", "m", "--word-l2r", "--batch_size", "4", "A b."])


def test_plot_parses_with_the_shared_parser(tmp_path):
    with pytest.raises(MinibertError, match="no metrics.jsonl"):  # parsed, then the run is read
        plot.run(plot.parse_args([str(tmp_path), "--output", str(tmp_path / "a.png")]))
    with pytest.raises(MinibertError, match=r"unknown option --outptu \(did you mean --output\?\)"):
        plot.parse_args([str(tmp_path), "--outptu", "a.png"])


@pytest.mark.parametrize("parse, typed, hint", [
    (parse_config, ["--batch-sise", "8"], "setting --batch-sise (did you mean --batch-size?)"),
    (parse_config, ["--batch_sise", "8"], "setting --batch_sise (did you mean --batch_size?)"),
    (parse_config, ["--lrr", "1e-4"], "setting --lrr (did you mean --lr?)"),
    (fill_mask.parse_args, ["--model", "m", "--top_kk", "3"],
     "option --top_kk (did you mean --top_k?)"),
    (fill_mask.parse_args, ["--model", "m", "--tpo-k", "3"],
     "option --tpo-k (did you mean --top-k?)"),
    (convert_weights.parse_args, ["a", "b", "--to_hff"],
     "option --to_hff (did you mean --to_hf?)"),
])
def test_did_you_mean_names_the_spelling_typed(parse, typed, hint):
    with pytest.raises(MinibertError) as error:
        parse(typed)
    assert str(error.value) == f"command line: unknown {hint}"


def test_errors_about_a_known_flag_name_it_as_typed():
    with pytest.raises(MinibertError, match="argument --top_k: invalid int value"):
        fill_mask.parse_args(["--model", "m", "--top_k", "many"])
    with pytest.raises(MinibertError, match="argument --max-steps: expected one argument"):
        parse_config(["--max-steps"])


def test_help_shows_one_spelling():
    parser = ArgumentParser(prog="demo")
    parser.add_argument("--top-k", type=int, default=5)
    text = parser.format_help()
    assert "--top-k" in text and "--top_k" not in text
    assert parser.parse_args(["--top_k", "2"]).top_k == 2
    # After "--" nothing is a flag: a sentence that happens to look like one stays as typed.
    assert parser.normalize(["--top_k", "2", "--", "--top_k"]) == ["--top-k", "2", "--", "--top_k"]


@pytest.mark.parametrize("argv0, prog", [
    (str(REPO / "minibert" / "fill_mask.py"), "python -m minibert.fill_mask"),
    ("/usr/local/bin/minibert-fill-mask", "minibert-fill-mask"),
    ("train.py", "train.py"),
])
def test_usage_names_the_command_as_called(monkeypatch, capsys, argv0, prog):
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as status:
        fill_mask.parse_args()
    assert status.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} ")


def run(*command):
    # PYTHONPATH: an installed console script imports this checkout's minibert, not another.
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_module_and_console_script_usage_lines():
    result = run(sys.executable, "-m", "minibert.fill_mask", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m minibert.fill_mask ")
    script = Path(sys.executable).parent / "minibert-fill-mask"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . creates it)")
    result = run(str(script), "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: minibert-fill-mask ")


def test_scripts_accept_the_other_spelling_end_to_end(tmp_path):
    # convert_weights.py in a real process: --to_hf (declared --to-hf) is honoured.
    assert run(sys.executable, "convert_weights.py", str(BERT_TINY), str(tmp_path / "mini")
               ).returncode == 0
    result = run(sys.executable, "convert_weights.py", str(tmp_path / "mini"),
                 str(tmp_path / "hf"), "--to_hf")
    assert result.returncode == 0, result.stderr
    assert "HuggingFace" in result.stdout
    result = run(sys.executable, "train.py", "--batch-sise", "8")
    assert result.returncode == 1
    assert result.stderr == ("error: command line: unknown setting --batch-sise "
                             "(did you mean --batch-size?)\n")


# Every command, by the name pip installs it under, and the function that name runs.
CONSOLE_SCRIPTS = {"minibert-train": "minibert.train_cli:main",
                   "minibert-convert": "minibert.convert_cli:main",
                   "minibert-fill-mask": "minibert.fill_mask:main",
                   "minibert-evaluate": "minibert.evaluate:main",
                   "minibert-score": "minibert.score:main",
                   "minibert-plot": "minibert.plot:main"}


def test_setup_installs_a_console_script_for_every_command():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg", encoding="utf-8")
    declared = dict(line.split(" = ") for line in
                    setup["options.entry_points"]["console_scripts"].strip().splitlines())
    assert declared == CONSOLE_SCRIPTS


@pytest.mark.parametrize("name", sorted(CONSOLE_SCRIPTS))
def test_every_console_script_shows_its_help(name, monkeypatch, capsys):
    """The script pip wrote, run in this process (one interpreter for all six, not six
    imports of torch): it finds its function, and the usage line names the command."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . creates it)")
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as status:
        runpy.run_path(str(script), run_name="__main__")
    assert status.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {name} ")


@pytest.mark.parametrize("module", ["minibert.train_cli", "minibert.convert_cli", "minibert.plot"])
def test_python_m_usage_lines(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["-m", "--help"])  # run_module puts the file's path first
    monkeypatch.delitem(sys.modules, module, raising=False)  # run afresh, as `python -m` does
    with pytest.raises(SystemExit) as status:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert status.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")
