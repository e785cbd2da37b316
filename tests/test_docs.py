"""The docs cannot drift from the code.

1. Every docs/examples/*.py runs on the shared assets, and every line it prints appears, as
   a line, in the chapter that quotes it. A changed shape, id or result fails here.
2. Every relative link in docs/ points at a file that exists. A link to a line,
   (../minibert/model.py#L167), must have code as its text, and that line must still hold
   it: `BertLayer` -> `class BertLayer`, `BertLayer.forward` -> `def forward` inside
   `class BertLayer`, `mask_tokens` -> `def mask_tokens` (or an assignment or field of that name),
   anything else -> the text itself, verbatim. When someone edits model.py, the failure names
   the line the text moved to.
3. Every file a chapter names in its text (configs/quickstart-cpu.toml, minibert/data.py) exists.
"""

from __future__ import annotations

import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ASSETS = REPO.parent / "shared" / "assets"

# example script -> (chapter that quotes its output, extra arguments). Output files go to a
# temporary folder, so running the tests never rewrites docs/images; the two scripts that
# tokenize WikiText-2 share one cache there (its file lock lets one build it).
EXAMPLES = {
    "tokens_to_logits.py": ("01-tokens-to-logits.md", []),
    "attention_map.py": ("01-tokens-to-logits.md", ["--out", "{tmp}/attention_map.png"]),
    "masking.py": ("02-masked-language-modelling.md", ["--cache-dir", "{tmp}/cache"]),
    "weight_names.py": ("03-weights.md", []),
    "training_step.py": ("04-training-on-several-gpus.md", ["--cache-dir", "{tmp}/cache"]),
    "pretraining.py": ("02-masked-language-modelling.md", ["--cache-dir", "{tmp}/cache"]),
    "measuring.py": ("05-measuring-a-model.md", ["--cache-dir", "{tmp}/cache"]),
}
# Pictures the lead engineer copies in from a training run rather than a docs example.
COPIED_IMAGES = {"images/quickstart_loss.png", "images/pretrain_loss.png"}

CODE_LINK = re.compile(r"\[`([^`]+)`\]\(([^)\s]+)\)")
ANY_LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


@pytest.fixture(scope="module")
def example_outputs(tmp_path_factory) -> dict[str, str]:
    """Run every example at once (they spend most of their time importing) and collect stdout."""
    if not ASSETS.is_dir():
        pytest.fail(f"shared assets not found at {ASSETS}: ../shared must sit beside the repo")
    tmp = tmp_path_factory.mktemp("docs-examples")
    processes = {}
    for script, (_, extra) in EXAMPLES.items():
        args = [a.format(tmp=tmp) for a in extra]
        processes[script] = subprocess.Popen(
            [sys.executable, str(DOCS / "examples" / script), "--assets", "../shared/assets",
             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            # An example's sys.path starts at docs/examples: import this checkout's minibert,
            # not whichever copy is installed.
            env={**os.environ, "PYTHONPATH": str(REPO)})
    outputs, failures = {}, []
    for script, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        outputs[script] = stdout
        if process.returncode != 0:
            failures.append(f"{script} failed:\n{stderr[-3000:]}")
    assert not failures, "\n".join(failures)
    return outputs


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


def test_pictures_exist():
    for name in ("attention_map.png",):
        data = (DOCS / "images" / name).read_bytes()
        assert data.startswith(b"\x89PNG"), name


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
        if (doc.parent / path).exists() or path in COPIED_IMAGES:
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
