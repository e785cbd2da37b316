"""Every script in benchmarks/ runs, with the smallest settings that go through its code, so
that a change that breaks one fails here rather than on the day someone measures.

The Python scripts run in this process (each is `run(parse_args(argv), argv)` or
`main(argv)` under `__main__`), and so do the fresh processes they start for a memory
measurement: the stand-in below gives the child's command line to the same script's
parse_args and run, here. The numbers they print are not checked (they are timings); that
every table, every row and the last line appear is. gpu.sh and gpu_session.sh run as far as
a machine without a GPU takes them: gpu.sh to its "no CUDA device" exit, gpu_session.sh to
its plan (DRY_RUN).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ASSETS, BERT_TINY, REPO

BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: `from common import ...`
import data as data_bench  # noqa: E402
import fill_mask as fill_mask_bench  # noqa: E402
import precision as precision_bench  # noqa: E402
import train_step as train_step_bench  # noqa: E402
import trainer as trainer_bench  # noqa: E402


def children_in_this_process(monkeypatch, script) -> list[list[str]]:
    """Replace the `subprocess.run` or `subprocess.Popen` of `[sys.executable, __file__, *argv]`
    with which `script` starts a fresh process of itself by the same script in this process
    (its environment is not applied); returns the argv of every child, as they are run."""
    children = []

    def child_output(command) -> str:
        assert command[:2] == [sys.executable, script.__file__], command
        children.append(command[2:])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            script.run(script.parse_args(command[2:]), command[2:])
        return out.getvalue()

    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, 0, child_output(command), "")

    class Popen:
        def __init__(self, command, **kwargs):
            self.command, self.pid, self.returncode = command, os.getpid(), None

        def communicate(self):
            stdout = child_output(self.command)
            self.returncode = 0
            return stdout, ""

    monkeypatch.setattr(script, "subprocess", SimpleNamespace(run=run, Popen=Popen,
                                                              PIPE=subprocess.PIPE))
    return children


def run_script(script, argv: list[str], capsys) -> list[str]:
    """The script's `__main__`, here; its printed lines."""
    script.run(script.parse_args(argv), argv)
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("script", [data_bench, fill_mask_bench, precision_bench,
                                    train_step_bench, trainer_bench],
                         ids=lambda s: Path(s.__file__).name)
def test_help(script, monkeypatch, capsys):
    if script is precision_bench:  # its main() reads sys.argv
        monkeypatch.setattr(sys, "argv", ["precision.py", "--help"])
        parse = lambda argv: script.main()  # noqa: E731
    else:
        parse = script.parse_args
    with pytest.raises(SystemExit) as status:
        parse(["--help"])
    assert status.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_fill_mask(monkeypatch, capsys):
    children = children_in_this_process(monkeypatch, fill_mask_bench)
    argv = ["--checkpoint", str(BERT_TINY), "--repeats", "1", "--warmup", "0"]
    lines = run_script(fill_mask_bench, argv, capsys)
    # The predictions are compared before anything is timed: the same top-5 for both.
    assert "bert-tiny-splade-mlm: same top-5 in one pass for both sentences" in "\n".join(lines)
    for row in ("one mask", "six masks"):
        assert sum(line.startswith(row) for line in lines) == 2  # latency and memory rows
    assert [child[-1] for child in children] == [
        f"{name}:{BERT_TINY}" for name in ("minibert", "minibert one pass", "transformers")]
    assert lines[-1].startswith("latency ratio minibert/transformers, one mask (medians): "
                                "bert-tiny-splade-mlm ")


def test_fill_mask_loads_the_same_weights_into_both_from_a_checkpoint_with_a_pooler():
    # MiniLM is a BertModel checkpoint: its pooler is kept by minibert, and BertForMaskedLM
    # has none, so it must be left out (this used to stop the script with "did not line up").
    minibert, hf, _, _ = fill_mask_bench.load_pair(ASSETS / "checkpoints"
                                                   / "minilm-l6-h384-uncased", seed=0)
    assert minibert.bert.pooler is not None
    ids = torch.tensor([[101, 7592, 103, 2088, 102]])
    with torch.no_grad():
        difference = (minibert(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert difference <= 1e-4  # as tests/test_convert.py's parity: float32, other kernels


def test_train_step(monkeypatch, capsys):
    children = children_in_this_process(monkeypatch, train_step_bench)
    argv = ["--seq", "8", "--batch", "2", "--steps", "1", "--warmup", "0"]
    lines = run_script(train_step_bench, argv, capsys)
    words = lines[1].split()  # loss before training (...): minibert L  transformers L
    assert lines[1].startswith("loss before training") and words[-4::2] == ["minibert",
                                                                             "transformers"]
    # The same weights and batch: the same starting loss (~10, float32 in two
    # implementations, printed to 6 decimals).
    assert float(words[-3]) == pytest.approx(float(words[-1]), rel=1e-5)
    assert [child[-1] for child in children] == ["minibert", "transformers"]
    table = {line.split()[0]: line for line in lines if line.startswith(("minibert ",
                                                                          "transformers "))}
    assert set(table) == {"minibert", "transformers"}
    assert all("MiB" in line for line in table.values())  # the peak memory column is filled
    assert lines[-1].startswith("ratio minibert/transformers tokens/s (medians of 1 steps): ")


def test_data(monkeypatch, capsys, tmp_path):
    children = children_in_this_process(monkeypatch, data_bench)
    corpus = tmp_path / "train.txt"
    text = (ASSETS / "corpus" / "wikipedia-sample" / "train.txt").read_text(encoding="utf-8")
    corpus.write_text("\n".join(text.splitlines()[:30]) + "\n", encoding="utf-8")
    # The large row from a 20 kB prefix of the corpus, its maps in 2 processes.
    lines = run_script(data_bench, ["--corpus", str(corpus), "--repeats", "1", "--large-mb",
                                    "0.02"], capsys)
    assert sorted(child[-1] for child in children) == ["minibert"] * 2 + ["transformers"] * 2
    assert sum("--map-processes" in child for child in children) == 2
    assert len(lines) == 11 and lines[5] == ""
    for table in (lines[:5], lines[6:]):  # heading, column names, two rows, the ratio
        assert table[0].startswith("data: ")
        rows = {line.split()[0]: line.split() for line in table[2:4]}
        assert set(rows) == {"minibert", "transformers"}
        assert all(int(row[4]) > 0 for row in rows.values())  # name cold MB/s warm blocks ...
        assert table[4].startswith("speed-up minibert vs datasets.map recipe, cold (medians): ")


def test_trainer_runs_both_loops_and_prints_the_ratio(capsys):
    trainer_bench.main(["--device", "cpu", "--seq", "32", "--batch", "2", "--grad-accum", "2",
                        "--steps", "20", "--warmup", "10", "--rounds", "1", "--step-baseline"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("minibert step alone (train_step.py)") for line in lines)
    assert lines[-1].startswith("ratio minibert/transformers tokens/s, whole training loop: ")
    assert float(lines[-1].rsplit(" ", 1)[1].rstrip("x")) > 0


def test_precision(monkeypatch, capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, size in (("train", 4000), ("valid", 1500)):
        text = (ASSETS / "corpus" / "wikipedia-sample" / f"{split}.txt").read_text()[:size]
        (corpus / f"{split}.txt").write_text(text.rsplit("\n", 1)[0] + "\n", encoding="utf-8")
    config = tmp_path / "tiny.toml"  # the quickstart's step at 2 x 32 tokens
    config.write_text(f'model = "{BERT_TINY}"\ndata = "{corpus}"\ncache_dir = "{tmp_path}/cache"\n'
                      'max_seq_length = 32\nbatch_size = 2\ndevice = "cpu"\n')
    monkeypatch.chdir(tmp_path)  # the script moves to the repository root; this moves back
    monkeypatch.setattr(sys, "argv", ["precision.py", "--config", str(config), "--repeats", "1",
                                      "--warmup", "0"])
    precision_bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu: ") and "auto -> " in lines[1]
    assert [line.split()[0] for line in lines[2:4]] == ["fp32", "bf16"]
    assert all(" step " in line and " matmul " in line for line in lines[2:4])
    assert lines[-1].startswith("load average at the end")


def bash(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    # PATH: the scripts call python3, which must be this environment's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PATH": path, **env}, timeout=600)


@pytest.mark.parametrize("script", ["gpu.sh", "gpu_session.sh"])
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(BENCHMARKS / script)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, gpu.sh would benchmark")
def test_gpu_sh_without_a_gpu_says_so_and_fails():
    result = bash("benchmarks/gpu.sh")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "gpu.sh: torch sees no CUDA device"


def test_gpu_session_plan_runs_every_gpu_test_once_within_the_budget():
    # The plan (DRY_RUN) names each part, its limit and its command; every test of
    # tests/test_gpu.py must be selected by exactly one part's -k (terms joined by "or").
    result = bash("benchmarks/gpu_session.sh", DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    parts = [re.match(r"=== ([\w-]+): limit (\d+) s: (.*)", line) for line in lines[:-1]]
    assert all(parts), lines
    assert int(lines[-1].split()[1]) <= 470  # seconds: 8 minutes with start-up
    selections = [part[3].split(" -k ")[1].split(" or ") for part in parts
                  if "tests/test_gpu.py" in part[3]]
    tests = re.findall(r"^def (test_\w+)", (REPO / "tests" / "test_gpu.py").read_text(), re.M)
    for test in tests:
        chosen = [terms for terms in selections if any(term in test for term in terms)]
        assert len(chosen) == 1, (test, chosen)
