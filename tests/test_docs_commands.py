"""Every shell command in the docs and the README runs as written, and the output they quote is
what the command printed.

1. The commands: each line of a ```sh / ```bash block (a trailing backslash continues it, `&&`
   chains two), each `$ command` line of an output block, and each `python ...` or
   `torchrun ...` written inline with arguments (`python -m minibert.score` alone names a
   command; a span with `...` in it is a template). Each is handled by what it is:
   - run, in this process, in a folder laid out like the repository with ../shared/assets
     beside it and the stand-ins prepared that the command reads (`work_folder`):
     convert_weights.py, fill-mask, score, plot, evaluate on at most 256 blocks, and the two
     chapter-1 examples when they write nothing into the repository. It must exit with
     status 0.
   - parsed by the real parser, not run: train.py (its settings are read and checked exactly
     as train.py reads them, then training is skipped: a run takes minutes), torchrun (its own
     parser, then the script or module it starts, the same way), an evaluation of more blocks,
     and a docs/examples script given arguments (tests/test_docs.py runs the examples).
   - checked: `pip install torch==X` pins the torch these tests run with and `.[test]` is an
     extra of setup.cfg; the test suite itself and the link fixer are not run from a test.
   A command that no longer runs, or no longer parses, fails here, naming its file and line.
2. The output quoted after a `$ command` line (up to the next `$` line or blank line): every
   line of it must be a line the command printed. A command run here is compared with what it
   printed here. A training run, and a command that reads the final/ folder of one (runs the
   suite does not repeat: they take minutes), is compared with the record of that run,
   docs/runs/NAME/output.txt, which holds each command's output under its `$ command` line;
   docs/runs/README.md says how the records were made.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib
import io
import re
import runpy
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.distributed.run import parse_args as torchrun_parse_args

import minibert.trainer
from minibert.checkpoint import read_checkpoint, save_pretrained

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ASSETS = REPO.parent / "shared" / "assets"
RECORDS = DOCS / "runs"  # the output of runs the suite does not repeat
DOCUMENTS = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
MAX_BLOCKS_RUN_HERE = 256  # an evaluation of more blocks is parsed, not run (seconds each)

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:[A-Z_]+=\S+ )*(?:python|torchrun) [^`]*)`")
ENVIRONMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")


@dataclass
class Command:
    doc: Path
    line: int
    text: str  # as written, continuation lines joined
    quoted: list[str] | None = None  # output lines quoted after a `$ command`; else None
    printed: list[str] = field(default_factory=list)  # what it printed here, when run here

    def __str__(self) -> str:
        where = self.doc.relative_to(REPO)
        return f"{where}:{self.line}: {self.text}"


def commands_in(doc: Path) -> list[Command]:
    """The commands of a markdown file, in the order they appear (see the module docstring)."""
    text = doc.read_text(encoding="utf-8")
    found = []
    for fence in FENCE.finditer(text):
        first = text.count("\n", 0, fence.start(2)) + 1
        lines = list(enumerate(fence.group(2).splitlines(), first))
        if fence.group(1) in ("sh", "bash"):
            pending, start = "", 0
            for number, line in lines:
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                start = start if pending else number
                pending += line.strip()
                if pending.endswith("\\"):
                    pending = pending[:-1].rstrip() + " "
                    continue
                found.append(Command(doc, start, pending.strip()))
                pending = ""
        elif not fence.group(1):
            current = None
            for number, line in lines:
                if line.startswith("$ "):
                    current = Command(doc, number, line[2:].strip(), quoted=[])
                    found.append(current)
                elif not line.strip():
                    current = None
                elif current is not None:
                    current.quoted.append(line.rstrip())
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        words = shlex.split(span.group(1))
        if "..." in span.group(1) or len(program(words)[1]) == 0:
            continue  # a command's name, or a template
        found.append(Command(doc, prose.count("\n", 0, span.start()) + 1, span.group(1)))
    return sorted(found, key=lambda command: command.line)


def program(words: list[str]) -> tuple[list[str], list[str]]:
    """(the program: ['python', '-m', 'minibert.evaluate'], ['python', 'train.py'] or
    ['torchrun'], its arguments), environment assignments in front left out."""
    while words and ENVIRONMENT.fullmatch(words[0]):
        words = words[1:]
    if words[:2] == ["python", "-m"]:
        return words[:3], words[3:]
    if words[:1] == ["python"]:
        return words[:2], words[2:]
    return words[:1], words[1:]


def chained(text: str) -> list[list[str]]:
    """The commands of one line, split at `&&`, each as words (shell comments dropped)."""
    words, commands = shlex.split(text, comments=True), [[]]
    for word in words:
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


# --------------------------------------------------------------------------------------------
# Running and parsing, in this process


class Parsed(Exception):
    """Raised where a command that is only parsed would start its work."""


@contextlib.contextmanager
def captured(argv: list[str]):
    """sys.argv set, stdout and stderr collected; yields the buffer."""
    buffer = io.StringIO()
    saved = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), \
                warnings.catch_warnings():
            # runpy warns that the module was imported before it ran as __main__: it was.
            warnings.simplefilter("ignore", RuntimeWarning)
            yield buffer
    finally:
        sys.argv = saved


def exit_status(error: SystemExit) -> int:
    return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)


def run_python(args: list[str], monkeypatch) -> tuple[int, str]:
    """`python ARGS` run as the shell would, in this process: (exit status, what it printed)."""
    module = args[1] if args[0] == "-m" else None
    with captured([module or args[0], *args[(2 if module else 1):]]) as out:
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(args[0], run_name="__main__")
            status = 0
        except SystemExit as error:
            status = exit_status(error)
    return status, out.getvalue()


def parse_python(args: list[str], monkeypatch) -> tuple[int, str]:
    """`python ARGS` read by its real parser and stopped before it starts its work."""
    module = args[1] if args[0] == "-m" else None
    rest = args[2:] if module else args[1:]

    def stop(config, environ):
        raise Parsed(config)

    def began_training(*args, **kwargs):
        raise AssertionError("a command that is only parsed started training: patch the "
                             "`train` it calls in parse_python")

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with captured([module or args[0], *rest]) as out, monkeypatch.context() as patch:
        try:
            if module:
                # parse_args(argv) -> the command's typed arguments, checked: the same call
                # its main makes before any work.
                importlib.import_module(module).parse_args(rest)
            elif Path(args[0]).name == "train.py":
                # The settings are read and checked as train.py reads them; training would
                # start in trainer.train, wherever the command imported it from.
                for module_name in ("minibert.trainer", "minibert.train_cli"):
                    module_ = importlib.import_module(module_name)
                    if hasattr(module_, "train"):
                        patch.setattr(module_, "train", stop)
                patch.setattr(minibert.trainer, "setup", began_training)
                runpy.run_path(args[0], run_name="__main__")
            else:  # a docs example: its argparse parser
                patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
                runpy.run_path(args[0], run_name="__main__")
            status = 0
        except Parsed:
            status = 0
        except SystemExit as error:
            status = exit_status(error)
        except Exception as error:  # a MinibertError from the typed arguments' checks
            print(f"error: {error}", file=out)
            status = 1
    return status, out.getvalue()


# Commands that only read (the checkpoints they read are the same stand-ins in every test):
# each distinct one runs once, and a document that repeats it gets the same output.
READING_COMMANDS = (["-m", "minibert.fill_mask"], ["-m", "minibert.score"],
                    ["-m", "minibert.evaluate"])
_READ_BEFORE: dict[tuple[str, ...], tuple[int, str]] = {}


def blocks_evaluated(args: list[str]) -> float:
    """--max_blocks of an evaluate command (every block when absent)."""
    for flag in ("--max_blocks", "--max-blocks"):
        if flag in args:
            return int(args[args.index(flag) + 1])
    return float("inf")


def execute(words: list[str], monkeypatch) -> tuple[str, int, str]:
    """('run' | 'parse' | 'check' | 'skip', exit status, what it printed) for one command."""
    name, args = program(words)
    if name[0] == "torchrun":
        with captured(["torchrun", *args]) as out:
            try:
                launch = torchrun_parse_args(args)
            except SystemExit as error:
                return "parse", exit_status(error), out.getvalue()
        inner = ([("-m" if launch.module else ""), launch.training_script]
                 + launch.training_script_args)
        return ("parse", *parse_python([w for w in inner if w], monkeypatch))
    if name[0] != "python":
        return "check", 1, f"{name[0]}: not a command this test knows how to check"
    if name[1:] == ["-m", "pip"]:
        return "check", *pip_install(args)
    if name[1:] == ["-m", "pytest"] or name[1].startswith("tests/"):
        return "skip", 0, "the test suite and the link fixer are not run from inside a test"
    if name[1:2] == ["-m"] and not name[2].startswith("minibert."):
        return "check", 1, f"python -m {name[2]}: not a command this test knows how to check"
    runs_here = (name[1] == "convert_weights.py"
                 # the examples that take a second and write nothing into the repository
                 or name[1] == "docs/examples/tokens_to_logits.py"
                 or (name[1] == "docs/examples/attention_map.py" and "--out" in args)
                 or name[1:] in (["-m", "minibert.fill_mask"], ["-m", "minibert.score"],
                                 ["-m", "minibert.plot"])
                 or (name[1:] == ["-m", "minibert.evaluate"]
                     and blocks_evaluated(args) <= MAX_BLOCKS_RUN_HERE))
    if runs_here:
        if name[1:] == ["-m", "minibert.plot"]:
            stand_in_runs(args)
        if name[1:] in READING_COMMANDS:  # the same reading command prints the same
            key = tuple(words)
            if key not in _READ_BEFORE:
                _READ_BEFORE[key] = run_python(name[1:] + args, monkeypatch)
            return ("run", *_READ_BEFORE[key])
        return ("run", *run_python(name[1:] + args, monkeypatch))
    return ("parse", *parse_python(name[1:] + args, monkeypatch))


def stand_in_runs(args: list[str]) -> None:
    """The run folders a plot command names, each with the recorded quickstart's metrics.jsonl
    where it has none: they stand for training runs this test does not make."""
    values = {i + 1 for i, arg in enumerate(args) if arg in ("-o", "--output", "--x")}
    for i, arg in enumerate(args):
        folder = Path(arg)
        if i not in values and not arg.startswith("-") and not (folder / "metrics.jsonl").exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(RECORDS / "quickstart" / "metrics.jsonl", folder)


def pip_install(args: list[str]) -> tuple[int, str]:
    """The install line pins the torch these tests run with; its extras exist."""
    problems = []
    for requirement in args:
        pinned = re.fullmatch(r"torch==([\w.]+)", requirement)
        if pinned and torch.__version__.split("+")[0] != pinned.group(1):
            problems.append(f"pins torch {pinned.group(1)}, the tests run {torch.__version__}")
        extras = re.fullmatch(r"\.\[([\w,]+)\]", requirement)
        if extras:
            setup = configparser.ConfigParser()
            setup.read(REPO / "setup.cfg")
            declared = set(setup["options.extras_require"])
            problems += [f"no extra {e!r} in setup.cfg" for e in extras.group(1).split(",")
                         if e not in declared]
    return (1 if problems else 0), "\n".join(problems)


# --------------------------------------------------------------------------------------------
# The folder commands run in


@pytest.fixture(scope="module")
def stand_in_model(tmp_path_factory) -> Path:
    """What a command reads from runs/quickstart/final or runs/pretrain-cpu/final: the shared
    bert-tiny as a minibert folder, the kind of folder a run's final/ is. Its numbers are not the
    run's: the output the docs quote from those runs is checked against their records."""
    model, source, _ = read_checkpoint(ASSETS / "checkpoints" / "bert-tiny-splade-mlm")
    return save_pretrained(model, tmp_path_factory.mktemp("stand-in") / "final",
                           tokenizer_source=source)


@pytest.fixture
def work_folder(tmp_path, stand_in_model, monkeypatch, tmp_path_factory) -> Path:
    """A folder laid out like the repository (its files linked in), ../shared/assets beside it,
    no out/, and the stand-ins the documented commands read: runs/quickstart/final and
    runs/pretrain-cpu/final (bert-tiny), runs/quickstart/metrics.jsonl (the record's),
    sentences.txt; a plot command gets the run folders it names (stand_in_runs). HOME points
    at a temporary folder, so the tokenized-blocks cache (~/.cache/minibert) is a fresh one
    shared by the tests of this file."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "assets").symlink_to(ASSETS)
    work = tmp_path / "repo"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("out", "runs") and not entry.name.startswith("."):
            (work / entry.name).symlink_to(entry)
    for run in ("quickstart", "pretrain-cpu"):
        (work / "runs" / run).mkdir(parents=True)
        (work / "runs" / run / "final").symlink_to(stand_in_model)
    shutil.copy(RECORDS / "quickstart" / "metrics.jsonl", work / "runs" / "quickstart")
    (work / "sentences.txt").write_text("They were happy to see us.\nThey was happy to see us.\n")
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return work


# --------------------------------------------------------------------------------------------
# The records of runs the suite does not repeat


def records() -> dict[tuple[str, ...], list[str]]:
    """(the words of a `$ command`) -> the lines it printed, from every docs/runs/*/output.txt."""
    found: dict[tuple[str, ...], list[str]] = {}
    for record in sorted(RECORDS.glob("*/output.txt")):
        current = None
        for line in record.read_text(encoding="utf-8").splitlines():
            if line.startswith("$ "):
                current = found.setdefault(tuple(shlex.split(line[2:])), [])
            elif current is not None:
                current.append(line.rstrip())
    return found


def quoted_but_not_printed(command: Command, printed: str | None,
                           recorded: dict[tuple[str, ...], list[str]]) -> str | None:
    """Why the output quoted under a `$ command` is not what it printed (None: it is)."""
    words = tuple(shlex.split(command.text))
    if words in recorded:  # a run not repeated here: its record is the truth
        source, lines = "the record in docs/runs", recorded[words]
    elif printed is not None:
        source, lines = "what it printed here", [line.rstrip() for line in printed.splitlines()]
    else:
        return "quotes output, but neither runs here nor has a record in docs/runs/*/output.txt"
    missing = [line for line in command.quoted if line not in lines]
    return (f"quotes lines that are not in {source}:\n  " + "\n  ".join(missing)
            if missing else None)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_runs_as_written(doc, work_folder, monkeypatch):
    recorded = records()
    failures = []
    for command in commands_in(doc):
        printed = None
        for words in chained(command.text):
            how, status, output = execute(words, monkeypatch)
            printed = output if how == "run" else None
            if status != 0:
                failures.append(f"{command}\n  did not {how} (status {status}):\n"
                                + "\n".join("    " + line for line in output.splitlines()[-12:]))
        if command.quoted is not None:
            problem = quoted_but_not_printed(command, printed, recorded)
            if problem:
                failures.append(f"{command}\n  {problem}")
    assert not failures, "\n".join(failures)


def test_the_commands_are_found():
    """The parsing above sees what a reader sees: a continued line, a chain, an inline command,
    a $ line with its output; a command's bare name and a template are not commands."""
    commands = {c.text: c for c in commands_in(REPO / "docs" / "06-measuring-a-model.md")}
    assert ("python -m minibert.evaluate --model ../shared/assets/checkpoints/bert-tiny-splade-mlm"
            " --data ../shared/assets/corpus/wikipedia-sample --max_seq_length 128 --max_blocks 64"
            " --precision fp32") in commands
    assert "python -m minibert.evaluate" not in commands
    readme = [c.text for c in commands_in(REPO / "docs" / "README.md")]
    assert chained(readme[0]) == [
        ["python", "-m", "pip", "install", "torch==2.13.0"],
        ["python", "-m", "pip", "install", "-e", ".[test]"]]
    assert program(shlex.split("NCCL_P2P_DISABLE=1 torchrun --nproc_per_node=2 train.py")) == (
        ["torchrun"], ["--nproc_per_node=2", "train.py"])


def test_a_command_that_no_longer_runs_fails(work_folder, monkeypatch):
    """What the test above does with a command that has drifted from the code."""
    for text in ("python -m minibert.fill_mask --model out/bert-tiny",  # no sentence
                 "python train.py --config configs/quickstart-cpu.toml --batch_size 0",
                 "python train.py --config configs/no-such-config.toml",
                 "torchrun --standalone --nproc_per_node=2 train.py --no_such_flag 1",
                 "python -m minibert.evaluate --model x --data y --no-such-flag",
                 "python docs/examples/masking.py --no-such-flag",
                 "python -m pip install torch==0.0.1"):
        how, status, output = execute(shlex.split(text), monkeypatch)
        assert status != 0, f"{text} ({how}) was accepted:\n{output}"
    how, status, _ = execute(shlex.split("python train.py --config configs/quickstart-cpu.toml "
                                         "--batch_size 16"), monkeypatch)
    assert (how, status) == ("parse", 0)


def test_quoted_output_must_be_what_was_printed():
    recorded = {("python", "train.py", "--config", "configs/x.toml"): ["step 0: eval loss 1.0"]}
    command = Command(REPO / "README.md", 1, "python train.py --config configs/x.toml",
                      quoted=["step 0: eval loss 1.0"])
    assert quoted_but_not_printed(command, None, recorded) is None
    command.quoted = ["step 0: eval loss 1.1"]
    assert "not in the record" in quoted_but_not_printed(command, None, recorded)
    command = Command(REPO / "README.md", 1, "python -m minibert.fill_mask --model m 'A [MASK].'",
                      quoted=["Top prediction:"])
    assert quoted_but_not_printed(command, "Input sentence: A [MASK].\nTop prediction:\n",
                                  recorded) is None
    assert "not in what it printed" in quoted_but_not_printed(command, "Top 1 predictions:\n",
                                                              recorded)
