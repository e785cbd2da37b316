"""Where a split's text comes from: a file, a folder of text files, a glob, in a stated order;
a missing split names the splits there; the WikiText hub name fails at once when offline."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minibert.splits as splits
from minibert import MinibertError, load_tokenizer
from minibert.data import load_blocks
from minibert.splits import available_splits, files_of
from test_data import (ARTEFACT_LINE, REPO, TOKENIZER_DIR, WIKIPEDIA_SAMPLE, WIKITEXT_TEST,
                       assert_one_line_error, todays_blocks, write)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


@pytest.fixture
def shards(tmp_path) -> list[Path]:
    """The Wikipedia validation text in four shards, written in reverse order of their names,
    the last without a line break at its end, plus files that are not shards."""
    lines = (WIKIPEDIA_SAMPLE / "valid.txt").read_text(encoding="utf-8").splitlines()
    folder = tmp_path / "shards"
    names = ["part-00.txt", "part-01.txt", "part-02.txt", "part-10.txt"]
    quarter = len(lines) // 4 + 1
    for index in reversed(range(4)):
        text = "\n".join(lines[index * quarter:(index + 1) * quarter])
        write(folder / names[index], [text + ("\n" if index < 3 else "")])
    write(folder / ".part-05.txt.swp", ["an editor's swap file, hidden\n"])
    (folder / "sub").mkdir()
    write(folder / "sub" / "part-03.txt", ["in a subfolder: only a glob with ** reads it\n"])
    return [folder / name for name in names]


def test_a_folder_of_text_files_is_read_in_sorted_order(tokenizer, tmp_path, shards):
    folder = shards[0].parent
    assert files_of(folder) == tuple(shards)  # hidden files and subfolders are left out
    blocks = load_blocks({"train": folder}, "train", tokenizer, 64, tmp_path / "cache",
                         show_progress=False)
    assert np.array_equal(blocks, todays_blocks(tokenizer, shards, 64))
    assert not np.array_equal(blocks, todays_blocks(tokenizer, shards[::-1], 64))


def test_a_glob_is_read_in_sorted_order(tokenizer, tmp_path, shards):
    folder = shards[0].parent
    assert files_of(folder / "part-0*.txt") == tuple(shards[:3])
    recursive = files_of(f"{folder}/**/part-*.txt")
    assert recursive == (*shards[:3], shards[3], folder / "sub" / "part-03.txt")
    assert files_of(folder / "part-1*.txt") == (shards[3],)
    blocks = load_blocks({"train": str(folder / "part-*.txt")}, "train", tokenizer, 64,
                         tmp_path / "cache", show_progress=False)
    assert np.array_equal(blocks, todays_blocks(tokenizer, shards, 64))
    # "part-10" sorts before "part-9" (code points), as the docstring warns.
    write(folder / "part-9.txt", ["nine\n"])
    assert files_of(folder / "part-*.txt")[-2:] == (shards[3], folder / "part-9.txt")


def test_lines_of_one_file_never_run_into_the_next(tokenizer, tmp_path):
    folder = tmp_path / "train"
    write(folder / "a.txt", ["first file ends without a line break @-@"])
    write(folder / "b.txt", [" second file", "\n"])
    blocks = load_blocks({"train": folder}, "train", tokenizer, 4, tmp_path / "cache",
                         show_progress=False)
    assert np.array_equal(blocks, todays_blocks(tokenizer, sorted(folder.iterdir()), 4))
    joined = load_blocks({"train": write(tmp_path / "one.txt", [
        "first file ends without a line break @-@ second file\n"])}, "train", tokenizer, 4,
        tmp_path / "cache", show_progress=False)
    assert not np.array_equal(blocks, joined)  # " @-@ " is joined only within one line


def test_a_data_folder_may_hold_a_split_as_a_subfolder(tokenizer, tmp_path, shards):
    data = tmp_path / "corpus"
    (data / "train").mkdir(parents=True)
    for shard in shards:
        (data / "train" / shard.name).write_bytes(shard.read_bytes())
    write(data / "validation" / "v.txt", [ARTEFACT_LINE] * 20)
    assert available_splits(data) == ["train", "validation"]
    train = load_blocks(data, "train", tokenizer, 64, tmp_path / "cache", show_progress=False)
    assert np.array_equal(train, todays_blocks(tokenizer, shards, 64))
    # Keyed by content, not by where it was found: the same files by another route hit it.
    again = load_blocks({"train": shards[0].parent}, "train", tokenizer, 64, tmp_path / "cache",
                        show_progress=False)
    assert np.array_equal(train, again)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    valid = load_blocks(data, "valid", tokenizer, 8, tmp_path / "cache", show_progress=False)
    assert np.array_equal(valid, todays_blocks(tokenizer, [data / "validation" / "v.txt"], 8))


def test_sources_that_hold_no_file_are_one_line_errors(tokenizer, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "empty"): "a folder with no files in it",
             str(tmp_path / "none-*.txt"): "no file matches",
             str(tmp_path / "absent.txt"): "no such file"}
    for where, message in cases.items():
        with pytest.raises(MinibertError) as error:
            load_blocks({"train": where}, "train", tokenizer, 8, tmp_path / "cache")
        assert_one_line_error(error, where, message)


def test_a_missing_split_names_the_splits_there(tokenizer, tmp_path):
    with pytest.raises(MinibertError) as error:
        load_blocks(WIKITEXT_TEST.parent, "validation", tokenizer, 128, tmp_path)
    assert_one_line_error(error, f"{WIKITEXT_TEST.parent}: no validation split (looked for "
                                 f"wiki.valid.raw, valid.txt, valid/, validation/); the splits "
                                 f"there: test")
    assert available_splits(WIKITEXT_TEST.parent) == ["test"]
    assert available_splits(WIKIPEDIA_SAMPLE) == ["train", "validation"]
    assert available_splits("wikitext-2-raw-v1") == ["train", "validation", "test"]


HUB_CHILD = """
import sys, time, types
from pathlib import Path
sys.modules["minibert"] = types.ModuleType("minibert")  # no torch: see test_data.CHILD
sys.modules["minibert"].__path__ = [sys.argv[1]]
from minibert.data import load_blocks
from minibert.errors import MinibertError
from minibert.tokenizer import load_tokenizer
tokenizer = load_tokenizer(sys.argv[2])
start = time.perf_counter()
try:
    load_blocks("wikitext-2-raw-v1", "test", tokenizer, 128, sys.argv[3], show_progress=False)
except MinibertError as error:
    print(f"{time.perf_counter() - start:.2f}")
    print(error)
"""


def closed_port() -> int:
    """A local TCP port that nothing listens on (a connection to it is refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_hub_name_fails_at_once_when_the_hub_cannot_be_reached(tmp_path):
    """The real datasets library, kept off any network: the hub's address is a closed local
    port and the HuggingFace cache an empty folder. Without offline mode, datasets retries
    for some 23 s (1 + 2 + 4 + 8 + 8 s of back-off) and prints a line per try; with it,
    datasets fails at once by itself."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                         "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")}
    base.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    runs = {mode: subprocess.Popen(
        [sys.executable, "-c", HUB_CHILD, str(REPO / "minibert"), str(TOKENIZER_DIR),
         str(tmp_path / mode)], env={**base, **extra}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
        for mode, extra in (("online", {}), ("offline", {"HF_DATASETS_OFFLINE": "1"}))}
    results = {mode: child.communicate(timeout=120) for mode, child in runs.items()}
    for mode, (stdout, stderr) in results.items():
        assert runs[mode].returncode == 0, stderr
        seconds, message = stdout.splitlines()
        assert float(seconds) < 10, (mode, seconds)  # one try at most, no back-off
        assert "Retrying" not in stderr, stderr
        assert message.startswith("cannot load wikitext-2-raw-v1"), message
        assert "wiki.test.raw" in message  # how to go on offline
    online, offline = (results[m][0].splitlines()[1] for m in ("online", "offline"))
    assert "cannot be reached (Connection refused)" in online
    assert "HF_DATASETS_OFFLINE=1" in online
    assert "offline mode is on" in offline


def test_offline_mode_skips_the_probe(tokenizer, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def probe(*args, **kwargs):
        raise AssertionError("probed the hub in offline mode")

    monkeypatch.setattr(splits, "unreachable", probe)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(
        {"text": [ARTEFACT_LINE] * 10}))
    blocks = load_blocks("wikitext-2-raw-v1", "test", tokenizer, 16, tmp_path,
                         show_progress=False)
    assert len(blocks) > 0
