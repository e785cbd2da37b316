"""Dependencies point one way: scripts -> plain functions of the package -> pure building
blocks. The model knows nothing of training, masking and data nothing of torch.distributed,
the commands nothing of train.py's config, saving state nothing of drawing, and the package
nothing of the scripts. Read from the source with ast, so nothing is imported: an import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minibert"

# The training side, which the model must not know about.
TRAINING = {"minibert.trainer", "minibert.train_config", "minibert.train_state",
            "minibert.optimizer", "minibert.training_log", "minibert.batches",
            "minibert.stopping", "minibert.resume", "minibert.distributed", "minibert.evaluate",
            "torch.distributed", "torch.optim"}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, by absolute name: `from .data import x` -> minibert.data,
    `from . import distributed` -> minibert.distributed, `from torch import distributed as
    dist` -> torch.distributed (a name imported from a package may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(REPO).parent.parts
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def reaches(module_names: set[str], target: str) -> bool:
    """Whether an imported name is `target` or lies inside it (torch.distributed.rpc)."""
    return any(name == target or name.startswith(target + ".") for name in module_names)


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_reader_sees_what_the_tests_check():
    """The rules below read real files: a renamed module must not make them pass vacuously."""
    names = {p.stem for p in package_modules()}
    assert {"model", "masking", "data", "evaluate", "score", "train_state", "plot",
            "train_config"} <= names
    assert imports(PACKAGE / "trainer.py") >= {"minibert.distributed", "torch"}
    assert "minibert.train_config" in imports(PACKAGE / "trainer.py")


def test_the_model_imports_nothing_from_training():
    found = imports(PACKAGE / "model.py")
    assert not {t for t in TRAINING if reaches(found, t)}, sorted(found)


@pytest.mark.parametrize("module", ["masking", "data"])
def test_building_blocks_import_nothing_distributed(module):
    found = imports(PACKAGE / f"{module}.py")
    assert not reaches(found, "torch.distributed") and not reaches(found, "minibert.distributed")


@pytest.mark.parametrize("module", ["evaluate", "score"])
def test_commands_do_not_import_the_training_config(module):
    """Device and precision choices live in precision.py; the commands check their own
    arguments and do not reach into train.py's config."""
    assert not reaches(imports(PACKAGE / f"{module}.py"), "minibert.train_config")


def test_saving_state_does_not_draw():
    """train_state.py writes what a resume needs; the trainer draws loss.png."""
    assert not reaches(imports(PACKAGE / "train_state.py"), "minibert.plot")


def test_the_package_does_not_import_the_scripts():
    scripts = {p.stem for p in REPO.glob("*.py")} | {
        p.name for p in REPO.iterdir() if p.is_dir() and p.name not in ("minibert",)
        and not p.name.startswith(".")}
    assert {"train", "convert_weights", "benchmarks", "tests"} <= scripts
    for path in package_modules():
        tops = {name.split(".")[0] for name in imports(path)}
        assert not tops & scripts, f"{path.relative_to(REPO)} imports {sorted(tops & scripts)}"
