"""The docs cannot drift from the code.

1. Every docs/examples/*.py runs on the shared assets, and every line it prints appears, as
   a line, in the chapter that quotes it. A changed shape, id or result fails here.
2. Every picture in docs/images is drawn by one of those scripts, and the committed file is
   what the script draws now. "What it draws" is checked on the pixels: the script draws into
   a temporary folder and the two images must have the same size and differ by at most
   PIXEL_RMS (the root mean square of the difference of their 0-255 channel values). The
   pictures' numbers are printed by the same scripts and quoted in the chapters (1.), so a
   changed curve, mask or weight fails twice. A tolerance and not equality, because another
   CPU rounds the last bit of a float differently and another matplotlib may anti-alias text
   differently. PIXEL_RMS sits below what one moved marker gives (1.4, see
   test_a_changed_picture_is_noticed) and far below what a changed curve gives.
3. Every relative link in docs/ points at a file that exists. A link to a line,
   (../minibert/model.py#L167), must have code as its text, and that line must still hold
   it: `BertLayer` -> `class BertLayer`, `BertLayer.forward` -> `def forward` inside
   `class BertLayer`, `mask_tokens` -> `def mask_tokens` (or an assignment or field of that name),
   anything else -> the text itself, verbatim. When someone edits model.py, the failure names
   the line the text moved to.
4. Every file a chapter names in its text (configs/quickstart-cpu.toml, minibert/data.py) exists;
   code shown under a `# docs/examples/NAME.py` line is that file's text, verbatim; "about N
   lines" of minibert/model.py is within 10% of its length.
5. The runs the suite does not repeat (docs/runs/): their output.txt holds the evaluation lines
   that their metrics.jsonl records (the curves are drawn from the one, the chapters quote the
   other), and their step-0 evaluation, which an example redoes in fp32 with today's code,
   agrees with it to bf16's precision. tests/test_docs_commands.py checks the commands.
"""

from __future__ import annotations

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ASSETS = REPO.parent / "shared" / "assets"
RUNS = DOCS / "runs"

# example script -> (chapter that quotes its output, extra arguments). Output files go to a
# temporary folder, so running the tests never rewrites docs/images; the scripts that
# tokenize the shared corpora share one cache there (its file lock lets one build each).
A = ["--assets", "../shared/assets"]
EXAMPLES = {
    "tokens_to_logits.py": ("01-tokens-to-logits.md", A),
    "attention_map.py": ("01-tokens-to-logits.md", A + ["--out", "{tmp}/images/attention_map.png"]),
    "masking.py": ("02-masked-language-modelling.md",
                   A + ["--cache-dir", "{tmp}/cache", "--images", "{tmp}/images"]),
    "weight_names.py": ("03-weights.md", A),
    "one_step.py": ("04-one-training-step.md", A + ["--cache-dir", "{tmp}/cache"]),
    "lr_schedule.py": ("04-one-training-step.md", ["--images", "{tmp}/images"]),
    "loss_curves.py": ("04-one-training-step.md",
                       A + ["--cache-dir", "{tmp}/cache", "--images", "{tmp}/images"]),
    "pretraining.py": ("04-one-training-step.md", A + ["--cache-dir", "{tmp}/cache"]),
    "training_step.py": ("05-training-on-several-gpus.md", A + ["--cache-dir", "{tmp}/cache"]),
    "ddp_timeline.py": ("05-training-on-several-gpus.md", ["--images", "{tmp}/images"]),
    "measuring.py": ("06-measuring-a-model.md", A + ["--cache-dir", "{tmp}/cache"]),
}
PIXEL_RMS = 1.0  # see the module docstring, 2.

CODE_LINK = re.compile(r"\[`([^`]+)`\]\(([^)\s]+)\)")
ANY_LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def example_run(tmp_path_factory) -> tuple[dict[str, str], Path]:
    """Run every example at once (they spend most of their time importing); their stdout, and
    the temporary folder they drew into."""
    if not ASSETS.is_dir():
        pytest.fail(f"shared assets not found at {ASSETS}: ../shared must sit beside the repo")
    tmp = tmp_path_factory.mktemp("docs-examples")
    processes = {}
    for script, (_, extra) in EXAMPLES.items():
        args = [a.format(tmp=tmp) for a in extra]
        processes[script] = subprocess.Popen(
            [sys.executable, str(DOCS / "examples" / script), *args], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # An example's sys.path starts at docs/examples: import this checkout's minibert,
            # not whichever copy is installed.
            env={**os.environ, "PYTHONPATH": str(REPO)})
    outputs, failures = {}, []
    for script, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        outputs[script] = stdout
        if process.returncode != 0:
            failures.append(f"{script} failed:\n{stderr[-3000:]}")
    assert not failures, "\n".join(failures)
    return outputs, tmp / "images"


@pytest.fixture(scope="module")
def example_outputs(example_run) -> dict[str, str]:
    return example_run[0]


def test_every_example_is_run_here():
    scripts = sorted(p.name for p in (DOCS / "examples").glob("*.py"))
    assert scripts == sorted(EXAMPLES), "add new docs/examples scripts to EXAMPLES"


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_docs_quote_what_the_examples_print(example_outputs, script):
    chapter = DOCS / EXAMPLES[script][0]
    doc_lines = {line.rstrip() for line in chapter.read_text(encoding="utf-8").splitlines()}
    printed = [line.rstrip() for line in example_outputs[script].splitlines() if line.strip()]
    assert printed, f"{script} printed nothing"
    missing = [line for line in printed if line not in doc_lines]
    assert not missing, (f"{chapter.name} no longer matches what {script} prints; rerun it and "
                         f"update the quoted output. Lines not in the chapter:\n"
                         + "\n".join(missing))


def pixel_rms(a: Path, b: Path) -> float:
    """Root mean square difference of two PNGs' channel values on a 0-255 scale (inf when
    their sizes differ)."""
    import matplotlib.image

    x, y = (matplotlib.image.imread(p).astype(np.float64) for p in (a, b))
    if x.shape != y.shape:
        return math.inf
    return float(np.sqrt(np.mean((x - y) ** 2)) * 255)


def test_every_picture_is_what_its_script_draws(example_run):
    _, drawn = example_run
    committed = sorted(p.name for p in (DOCS / "images").glob("*.png"))
    made = sorted(p.name for p in drawn.glob("*.png"))
    assert committed == made, (f"docs/images holds {committed}, the examples draw {made}: every "
                               f"picture comes from a docs/examples script")
    different = {name: rms for name in made
                 if (rms := pixel_rms(DOCS / "images" / name, drawn / name)) > PIXEL_RMS}
    assert not different, (f"pictures that are no longer what their script draws (pixel RMS; "
                           f"run the script to redraw them): {different}")


def test_a_changed_picture_is_noticed(example_run, tmp_path):
    """What PIXEL_RMS lets through, and what it does not: one argmax circle of
    attention_map.png drawn a few pixels to the side (about 1.4 on its 1120 x 640 pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    _, drawn = example_run
    image = matplotlib.image.imread(drawn / "attention_map.png")

    def redraw(name: str, circle_at: tuple[float, float] | None) -> Path:
        fig = plt.figure(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
        fig.figimage(image)
        if circle_at:
            # A figure-level artist above the image (an axes would be drawn under it).
            fig.add_artist(plt.Circle(circle_at, 0.007, transform=fig.transFigure, fill=False,
                                      color="red", linewidth=1.4, zorder=10))
        fig.savefig(tmp_path / name, dpi=100)
        plt.close(fig)
        return tmp_path / name

    assert pixel_rms(drawn / "attention_map.png", redraw("same.png", None)) <= PIXEL_RMS
    assert pixel_rms(redraw("here.png", (0.30, 0.5)), redraw("moved.png", (0.35, 0.5))) > PIXEL_RMS


def expected_text(code: str, lines: list[str], number: int) -> tuple[str, bool]:
    """(what the linked line must contain, whether it does) for the link text `code`."""
    line = lines[number - 1] if 0 < number <= len(lines) else ""
    method = re.fullmatch(r"([A-Z]\w*)\.(\w+)", code)
    if method:
        owner, name = method.groups()
        enclosing = next((m.group(1) for text in reversed(lines[:number - 1])
                          if (m := re.match(r"class (\w+)", text))), None)
        return f"def {name} in class {owner}", f"def {name}(" in line and enclosing == owner
    if re.fullmatch(r"\w+", code):
        # CamelCase: class X. Otherwise def X(, or an assignment or a dataclass field
        # (X = ..., X: ...) at the start of the line.
        if code[0].isupper() and not code.isupper():
            pattern = rf"\s*class {code}\b"
        else:
            pattern = rf"\s*(def {code}\(|{code}\s*(:|=(?!=)))"
        return f"a definition of {code}", bool(re.match(pattern, line))
    return code, code in line


def find_line(code: str, lines: list[str]) -> int | None:
    return next((n for n in range(1, len(lines) + 1) if expected_text(code, lines, n)[1]), None)


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.name)
def test_relative_links_exist(doc):
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in ANY_LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and anchors within the page
        path = target.split("#")[0]
        if (doc.parent / path).exists():
            continue
        broken.append(target)
    assert not broken, f"{doc.name}: links to files that do not exist: {broken}"


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.name)
def test_line_links_point_at_what_they_name(doc):
    text = doc.read_text(encoding="utf-8")
    code_links = {target for _, target in CODE_LINK.findall(text)}
    plain = [t for t in ANY_LINK.findall(text) if "#L" in t and t not in code_links]
    assert not plain, f"{doc.name}: a link to a line must have `code` as its text: {plain}"
    problems = []
    for code, target in CODE_LINK.findall(text):
        match = re.fullmatch(r"([^#]+)#L(\d+)(?:-L\d+)?", target)
        if not match:
            continue
        source = (doc.parent / match.group(1)).resolve()
        lines = source.read_text(encoding="utf-8").splitlines()
        number = int(match.group(2))
        wanted, ok = expected_text(code, lines, number)
        if not ok:
            now = find_line(code, lines)
            where = f"now at #L{now}" if now else "found nowhere in the file"
            problems.append(f"{target}: expected {wanted!r}; {where}")
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: p.name)
def test_files_named_in_the_text_exist(doc):
    """Paths written out in prose or commands (configs/quickstart-cpu.toml, minibert/data.py,
    tests/test_train.py, train.py) must exist, relative to the repository root."""
    text = doc.read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w./])((?:configs|minibert|tests|docs/examples)/[\w-]+\.(?:py|toml)"
                           r"|(?:train|convert_weights)\.py)\b", text))
    missing = sorted(name for name in named if not (REPO / name).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_code_shown_is_the_example_file():
    """A ```python block that starts with `# docs/examples/NAME.py` shows that file's text."""
    shown = 0
    problems = []
    for doc in markdown_files():
        text = doc.read_text(encoding="utf-8")
        for block in re.finditer(r"^```python\n# (docs/examples/[\w.]+\.py)\n(.*?)^```", text,
                                 re.S | re.M):
            shown += 1
            if block.group(2) not in (REPO / block.group(1)).read_text(encoding="utf-8"):
                problems.append(f"{doc.name}: the code shown from {block.group(1)} is not its text")
    assert shown and not problems, "\n".join(problems) or "no code shown from docs/examples"


def test_the_length_of_model_py_is_what_the_docs_say():
    text = (DOCS / "README.md").read_text(encoding="utf-8")
    quoted = int(re.search(r"It is about (\d+) lines", text).group(1))
    actual = len((REPO / "minibert" / "model.py").read_text(encoding="utf-8").splitlines())
    assert abs(quoted - actual) <= 0.1 * actual, (
        f"docs/README.md says minibert/model.py is about {quoted} lines; it has {actual}")


def recorded_metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in (RUNS / run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("run", ["quickstart", "pretrain-cpu"])
def test_a_recorded_run_is_whole_and_its_output_and_metrics_agree(run):
    """Its metrics.jsonl (the curves) and output.txt (what the chapters quote) are one run, and
    a finished one: every evaluation line printed as train.py prints it, the last at max_steps."""
    records = recorded_metrics(run)
    output = (RUNS / run / "output.txt").read_text(encoding="utf-8").splitlines()
    evaluations = [f"step {r['step']}: eval loss {r['eval_loss']:.4f}, perplexity "
                   f"{r['eval_perplexity']:.2f}, accuracy {r['eval_accuracy']:.4f}"
                   for r in records if "eval_loss" in r]
    missing = [line for line in evaluations if line not in output]
    assert not missing, f"docs/runs/{run}: output.txt lacks metrics.jsonl's lines {missing}"
    config = (REPO / "configs" / f"{run}-cpu.toml" if run == "quickstart"
              else REPO / "configs" / f"{run}.toml").read_text(encoding="utf-8")
    max_steps = int(re.search(r"^max_steps = (\d+)", config, re.M).group(1))
    assert records[-1]["step"] == max_steps and "eval_loss" in records[-1]


def test_the_readme_quotes_the_recorded_quickstart():
    """The README's "from about 4,660 before training to about 110 after" (and the like) are
    the recorded run's first and last evaluation perplexities, to the figures it gives."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"perplexity goes from about ([\d,]+) before\s+training to about ([\d,]+) "
                      r"after", text)
    assert found, "README.md no longer quotes the quickstart's perplexities"
    records = [r for r in recorded_metrics("quickstart") if "eval_perplexity" in r]
    for quoted, record in zip(found.groups(), (records[0], records[-1])):
        value = int(quoted.replace(",", ""))
        figures = len(quoted.replace(",", "").rstrip("0"))  # 4,660: 3 figures; 110: 2
        assert value == float(f"{record['eval_perplexity']:.{figures}g}"), (
            f"README.md says about {quoted}; the recorded quickstart's step {record['step']} "
            f"has {record['eval_perplexity']:.2f}")


@pytest.mark.parametrize("run, script, pattern", [
    ("pretrain-cpu", "pretraining.py", r"its step-0 evaluation in fp32 .*: eval loss ([\d.]+)"),
    ("quickstart", "measuring.py", r"the quickstart's step 0, in fp32: .*loss ([\d.]+)"),
])
def test_a_recorded_runs_step_0_is_what_the_code_computes_today(example_outputs, run, script,
                                                                 pattern):
    """The run evaluated in bf16; the example redoes its step-0 evaluation in fp32 with today's
    code. They agree to bf16's precision (relative 1e-2): a changed initialisation, model or
    evaluation would not."""
    today = float(re.search(pattern, example_outputs[script]).group(1))
    recorded = recorded_metrics(run)[0]["eval_loss"]
    assert math.isclose(today, recorded, rel_tol=1e-2), (
        f"docs/runs/{run} started at eval loss {recorded:.4f}; {script} computes {today:.4f} "
        f"today: make the run again (docs/runs/README.md)")


def fix_line_links() -> None:
    """Rewrite each stale #Lnn in docs/*.md to the line that now holds the cited code.

        python tests/test_docs.py --fix-links

    Only links whose text is found elsewhere in the file are moved; read the diff before
    committing, since a snippet that occurs twice is moved to its first occurrence."""
    for doc in markdown_files():
        text = doc.read_text(encoding="utf-8")

        def fix(match: re.Match) -> str:
            code, target = match.groups()
            parts = re.fullmatch(r"([^#]+)#L(\d+)", target)
            if not parts:
                return match.group(0)
            lines = (doc.parent / parts.group(1)).read_text(encoding="utf-8").splitlines()
            if expected_text(code, lines, int(parts.group(2)))[1]:
                return match.group(0)
            now = find_line(code, lines)
            if now is None:
                print(f"{doc.name}: `{code}` is no longer in {parts.group(1)}: edit the text")
                return match.group(0)
            print(f"{doc.name}: `{code}` #L{parts.group(2)} -> #L{now}")
            return f"[`{code}`]({parts.group(1)}#L{now})"

        fixed = CODE_LINK.sub(fix, text)
        if fixed != text:
            doc.write_text(fixed, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix-links"]:
        sys.exit("usage: python tests/test_docs.py --fix-links")
    fix_line_links()
