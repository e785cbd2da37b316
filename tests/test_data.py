"""The corpus pipeline: reading splits, chunking into blocks, the cache and its lock, errors."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minibert.data as data
from minibert import MinibertError, load_tokenizer
from minibert.data import corpus_stats, load_blocks

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WIKIPEDIA_SAMPLE = ASSETS / "corpus" / "wikipedia-sample"
WIKITEXT_TEST = ASSETS / "corpus" / "wikitext-2-raw" / "wiki.test.raw"
TOKENIZER_DIR = ASSETS / "checkpoints" / "bert-tiny-splade-mlm"
ARTEFACT_LINE = " The guest @-@ starring role paid 1 @,@ 000 for 3 @.@ 5 hours . \n"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def write(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def my_tokens(tokenizer, path: Path, join: bool = True) -> list[int]:
    """The test's own reading of a corpus: strip, drop blank lines, join artefacts, and
    tokenize the whole text as one string."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").split("\n")]
    text = "\n".join(line for line in lines if line)
    if join:
        text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    return tokenizer.encode(text, add_special_tokens=False).ids


def assert_one_line_error(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("corpus, split", [(WIKIPEDIA_SAMPLE, "valid"),
                                           (WIKITEXT_TEST.parent, "test")])
def test_chunking_keeps_every_token(tokenizer, tmp_path, corpus, split):
    blocks = load_blocks(corpus, split, tokenizer, 128, tmp_path, show_progress=False)
    assert blocks.dtype == np.int32 and blocks.shape[1] == 128
    file = {"valid": corpus / "valid.txt", "test": corpus / "wiki.test.raw"}[split]
    tokens = my_tokens(tokenizer, file)
    stats = corpus_stats(blocks)
    remainder = len(tokens) - stats["tokens"]
    assert 0 <= remainder < 126  # only the last, shorter piece of the split is dropped
    assert blocks[:, 1:-1].ravel().tolist() == tokens[:stats["tokens"]]
    assert (blocks[:, 0] == tokenizer.token_to_id("[CLS]")).all()
    assert (blocks[:, -1] == tokenizer.token_to_id("[SEP]")).all()
    frame = [tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]")]
    assert not np.isin(blocks[:, 1:-1], frame).any()


def test_text_spelling_special_tokens_is_read_as_unk(tokenizer, tmp_path):
    file = write(tmp_path / "corpus" / "train.txt",
                 ["hello [SEP] world [CLS] x [MASK] [PAD]\n"] * 4)
    blocks = load_blocks(file.parent, "train", tokenizer, 10, tmp_path / "cache",
                         show_progress=False)
    hello, world, x, unk = (tokenizer.token_to_id(t) for t in ("hello", "world", "x", "[UNK]"))
    line = [hello, unk, world, unk, x, unk, unk]
    assert blocks.shape == (3, 10)  # 28 tokens: three blocks of 8, 4 left over
    assert blocks[:, 1:-1].ravel().tolist() == (line * 4)[:24]


def test_wikitext_artefacts_are_joined_unless_asked_to_keep_them(tokenizer, tmp_path):
    folder = tmp_path / "wikitext"
    write(folder / "wiki.train.raw", [" = Heading = \n", "\n", "   \n", ARTEFACT_LINE] * 10)
    joined = load_blocks(folder, "train", tokenizer, 16, tmp_path / "cache", show_progress=False)
    kept = load_blocks(folder, "train", tokenizer, 16, tmp_path / "cache", show_progress=False,
                       join_wikitext_artifacts=False)
    assert joined.ravel()[1:-1].tolist() != kept.ravel()[1:-1].tolist()
    stream = joined[:, 1:-1].ravel().tolist()
    assert stream == my_tokens(tokenizer, folder / "wiki.train.raw")[:len(stream)]
    text = tokenizer.decode(stream)
    assert text.startswith("= heading = the guest - starring role paid 1, 000 for 3. 5 hours.")
    assert "@" not in text
    kept_stream = kept[:, 1:-1].ravel().tolist()
    unjoined = my_tokens(tokenizer, folder / "wiki.train.raw", join=False)
    assert kept_stream == unjoined[:len(kept_stream)]
    assert "guest @ - @ starring" in tokenizer.decode(kept_stream)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # the switch is part of the key


def test_cache_hit_loads_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    first = load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 64, tmp_path, show_progress=False)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache hit")

    monkeypatch.setattr(data, "tokenize_lines", no_tokenizing)  # proves it: no wall clock
    second = load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 64, tmp_path, show_progress=False)
    assert isinstance(second, np.memmap) and np.array_equal(first, second)
    with pytest.raises(ValueError):
        second[0, 0] = 0  # read-only: no process can scribble on the shared cache
    assert [p.suffix for p in tmp_path.iterdir() if p.suffix != ".lock"] == [".npy"]


def test_cache_is_rebuilt_when_the_corpus_or_the_block_length_changes(tokenizer, tmp_path):
    file = write(tmp_path / "corpus" / "test.txt", [ARTEFACT_LINE] * 20)
    before = load_blocks(file.parent, "test", tokenizer, 16, tmp_path / "cache",
                         show_progress=False)
    write(file, [ARTEFACT_LINE.replace("guest", "host")] * 20)
    after = load_blocks(file.parent, "test", tokenizer, 16, tmp_path / "cache",
                        show_progress=False)
    assert after.shape == before.shape and not np.array_equal(before, after)
    assert after[:, 1:-1].ravel().tolist() == my_tokens(tokenizer, file)[:after[:, 1:-1].size]
    longer = load_blocks(file.parent, "test", tokenizer, 32, tmp_path / "cache",
                         show_progress=False)
    assert longer.shape[1] == 32
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3


CHILD = """
import hashlib, os, sys, time, types
from pathlib import Path
corpus, cache, markers, go, tokenizer_dir, package = map(Path, sys.argv[1:])
# The package's __init__ imports torch, seconds per process on a busy machine; data.py and
# tokenizer.py do not need it, so import them from an empty package of the same name.
sys.modules["minibert"] = types.ModuleType("minibert")
sys.modules["minibert"].__path__ = [str(package)]
import minibert.data as data
from minibert.tokenizer import load_tokenizer
assert "torch" not in sys.modules
build = data.tokenize_lines
def counting_build(*args, **kwargs):
    (markers / f"built-{os.getpid()}").touch()
    time.sleep(0.5)  # hold the lock long enough that the other processes must wait on it
    return build(*args, **kwargs)
data.tokenize_lines = counting_build
tokenizer = load_tokenizer(tokenizer_dir)
(markers / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
blocks = data.load_blocks(corpus, "train", tokenizer, 32, cache, show_progress=False)
print(hashlib.sha256(blocks.tobytes()).hexdigest())
"""


def test_concurrent_processes_build_the_cache_once(tokenizer, tmp_path):
    """Three processes (as torchrun ranks) ask for the same blocks at the same moment."""
    file = write(tmp_path / "corpus" / "train.txt", [ARTEFACT_LINE] * 50)
    markers, go = tmp_path / "markers", tmp_path / "go"
    markers.mkdir()
    arguments = [file.parent, tmp_path / "cache", markers, go, TOKENIZER_DIR, REPO / "minibert"]
    children = [subprocess.Popen([sys.executable, "-c", CHILD, *map(str, arguments)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    deadline = time.time() + 60
    while len(list(markers.glob("ready-*"))) < 3 and time.time() < deadline:
        assert all(child.poll() is None for child in children), children[0].communicate()
        time.sleep(0.05)
    go.touch()  # release all three at once
    outputs = [child.communicate(timeout=60) for child in children]
    assert all(child.returncode == 0 for child in children), outputs
    assert len(list(markers.glob("built-*"))) == 1
    expected = load_blocks(file.parent, "train", tokenizer, 32, tmp_path / "cache",
                           show_progress=False)
    assert {out.strip() for out, _ in outputs} == {hashlib.sha256(expected.tobytes()).hexdigest()}
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_split_names_layouts_and_explicit_files(tokenizer, tmp_path):
    valid = load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 512, tmp_path, show_progress=False)
    validation = load_blocks(WIKIPEDIA_SAMPLE, "validation", tokenizer, 512, tmp_path,
                             show_progress=False)
    explicit = load_blocks({"valid": WIKIPEDIA_SAMPLE / "valid.txt"}, "validation", tokenizer,
                           512, tmp_path, show_progress=False)
    assert np.array_equal(valid, validation) and np.array_equal(valid, explicit)
    assert len(list(tmp_path.glob("*.npy"))) == 1  # keyed by content, not by how it was named
    folder = tmp_path / "wikitext"
    write(folder / "wiki.valid.raw", [ARTEFACT_LINE] * 30)
    write(folder / "valid.txt", [" other text \n"] * 30)  # wiki.*.raw is looked for first
    blocks = load_blocks(folder, "valid", tokenizer, 8, tmp_path, show_progress=False)
    assert "guest" in tokenizer.decode(blocks[0].tolist())


def test_wikitext_names_go_through_datasets(tokenizer, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": ["", ARTEFACT_LINE] * 10}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    blocks = load_blocks("wikitext-2-raw-v1", "valid", tokenizer, 16, tmp_path,
                         show_progress=False)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")]
    assert "guest-starring" in tokenizer.decode(blocks[0].tolist()).replace(" - ", "-")


def test_wikitext_name_offline_says_how_to_pass_local_files(tokenizer, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MinibertError) as error:
        load_blocks("wikitext-103-raw-v1", "train", tokenizer, 128, tmp_path)
    assert_one_line_error(error, "wikitext-103-raw-v1", "Couldn't reach", "wiki.train.raw",
                          "{split: file}")


def test_bad_input_is_one_line_error_naming_the_problem(tokenizer, tmp_path):
    def error_of(data, split="train", max_seq_length=16):
        with pytest.raises(MinibertError) as error:
            load_blocks(data, split, tokenizer, max_seq_length, tmp_path / "cache",
                        show_progress=False)
        return error

    missing = tmp_path / "nowhere"
    assert_one_line_error(error_of(missing), str(missing), "no such folder")
    assert_one_line_error(error_of(WIKIPEDIA_SAMPLE, "test"), str(WIKIPEDIA_SAMPLE),
                          "no test split", "wiki.test.raw", "test.txt")
    assert_one_line_error(error_of({"train": WIKIPEDIA_SAMPLE / "train.txt"}, "test"),
                          "no test split", "have: train")
    assert_one_line_error(error_of({"train": missing / "train.txt"}), str(missing / "train.txt"),
                          "no such file")
    assert_one_line_error(error_of(WIKIPEDIA_SAMPLE / "train.txt"), "is a file")
    assert_one_line_error(error_of(WIKIPEDIA_SAMPLE, "dev"), "unknown split 'dev'")
    blank = write(tmp_path / "blank" / "train.txt", ["\n", "   \n", " \n"])
    assert_one_line_error(error_of(blank.parent), str(blank), "empty")
    short = write(tmp_path / "short" / "train.txt", ["a few words\n"])
    assert_one_line_error(error_of(short.parent), str(short), "3 tokens", "too short",
                          "max_seq_length 16")
    binary = tmp_path / "binary" / "train.txt"
    binary.parent.mkdir()
    binary.write_bytes(b"\xff\xfe\x00 not utf-8")
    assert_one_line_error(error_of(binary.parent), str(binary), "UTF-8")
    for bad_length in (2, 0, 12.0):
        assert_one_line_error(error_of(WIKIPEDIA_SAMPLE, "valid", bad_length), "max_seq_length",
                              ">= 3")
