"""Every command's --help works: the entry points not covered by their own test files."""

import subprocess
import sys

import pytest

from conftest import REPO

COMMANDS = {
    "plot": ["-m", "minibert.plot", "--help"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_help(name):
    result = subprocess.run([sys.executable, *COMMANDS[name]], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
