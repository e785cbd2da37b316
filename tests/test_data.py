"""The corpus pipeline: reading splits, chunking into blocks, the cache and its lock, errors."""

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minibert.data as data
import minibert.splits as splits
from minibert import MinibertError, load_tokenizer
from minibert.data import corpus_stats, load_blocks
from minibert.tokenizer import spelled_special_ids

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


def todays_blocks(tokenizer, files, max_seq_length: int, join: bool = True) -> np.ndarray:
    """The blocks as minibert built them before it streamed (commit 4454ba6), kept here as the
    reference: every file read whole and split into lines, blank lines dropped, the others
    stripped and their WikiText artefacts joined, every line tokenized, the ids concatenated,
    spelled special tokens read as [UNK], the stream cut into [CLS] piece [SEP]."""
    lines = [line for file in files
             for line in Path(file).read_text(encoding="utf-8").splitlines()]
    cleaned = []
    for line in lines:
        line = line.strip()
        if line and join:
            for artefact, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
                line = line.replace(artefact, joined)
        if line:
            cleaned.append(line)
    ids = np.array([i for encoding in tokenizer.encode_batch(cleaned, add_special_tokens=False)
                    for i in encoding.ids], dtype=np.int32)
    ids[np.isin(ids, spelled_special_ids(tokenizer))] = tokenizer.token_to_id("[UNK]")
    piece = max_seq_length - 2
    count = len(ids) // piece
    blocks = np.empty((count, max_seq_length), dtype=np.int32)
    blocks[:, 0], blocks[:, -1] = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    blocks[:, 1:-1] = ids[:count * piece].reshape(count, piece)
    return blocks


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


@pytest.mark.parametrize("file, max_seq_length, chunk_bytes", [
    (WIKIPEDIA_SAMPLE / "train.txt", 128, None), (WIKIPEDIA_SAMPLE / "valid.txt", 512, None),
    (WIKITEXT_TEST, 128, None), (WIKITEXT_TEST, 64, 4099)],
    ids=["wikipedia-train", "wikipedia-valid", "wikitext-test", "wikitext-test-4099B-chunks"])
def test_streamed_blocks_equal_todays_on_the_shared_corpora(tokenizer, tmp_path, monkeypatch,
                                                            file, max_seq_length, chunk_bytes):
    if chunk_bytes:  # many chunk boundaries, inside lines and inside UTF-8 characters
        monkeypatch.setattr(splits, "CHUNK_BYTES", chunk_bytes)
    blocks = load_blocks({"train": file}, "train", tokenizer, max_seq_length, tmp_path,
                         show_progress=False)
    expected = todays_blocks(tokenizer, [file], max_seq_length)
    assert blocks.dtype == expected.dtype and blocks.shape == expected.shape
    assert np.array_equal(blocks, expected)


# Every kind of line break str.splitlines knows, CRLF and lone CR, characters of 2, 3 and 4
# bytes, a byte-order mark, artefacts, spelled special tokens, a line longer than a chunk, and
# no line break at the very end.
AWKWARD_TEXT = ("\ufeffcafé @-@ naïve\r\nsecond line\rthird\n\n  \r\n日本語の文 [SEP] x\u2028after "
                "a line separator\x85next line\x0bvertical tab\x0cform feed\x1cfile sep "
                "😀 emoji @,@ 4 @.@ 5\n" + "a very long line " * 40 + "\n[MASK] [CLS] end")


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64, 1 << 20])
def test_chunk_boundaries_change_nothing(tokenizer, tmp_path, monkeypatch, chunk_bytes):
    file = tmp_path / "corpus" / "train.txt"
    file.parent.mkdir()
    file.write_bytes((AWKWARD_TEXT * 3).encode("utf-8"))
    monkeypatch.setattr(splits, "CHUNK_BYTES", chunk_bytes)
    blocks = load_blocks(file.parent, "train", tokenizer, 8, tmp_path / "cache",
                         show_progress=False)
    assert np.array_equal(blocks, todays_blocks(tokenizer, [file], 8))


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 1 << 20])
def test_text_that_is_not_utf8_is_reported_at_its_byte(tokenizer, tmp_path, monkeypatch,
                                                       chunk_bytes):
    monkeypatch.setattr(splits, "CHUNK_BYTES", chunk_bytes)
    good = ("é日😀 line\n" * 50).encode("utf-8")  # 15 bytes a line: 750
    for bad, reason in ((b"\xff tail\n", "invalid start byte"),
                        (b"\xe6\x97", "unexpected end of data")):  # a character cut at the end
        file = tmp_path / reason / "train.txt"
        file.parent.mkdir()
        file.write_bytes(good + bad)
        with pytest.raises(MinibertError) as error:
            load_blocks(file.parent, "train", tokenizer, 8, tmp_path / "cache",
                        show_progress=False)
        assert_one_line_error(error, f"{file}: cannot read as UTF-8 text (byte 750: {reason})")


def test_tokenizes_a_chunk_at_a_time_and_writes_blocks_as_they_come(tokenizer, tmp_path,
                                                                    monkeypatch):
    """Memory does not grow with the corpus: no call sees more than one chunk of text, and
    blocks go to the file after every chunk rather than at the end."""
    monkeypatch.setattr(splits, "CHUNK_BYTES", 50_000)
    seen, written = [], []
    tokenize, frame = data.tokenize_lines, data.frame_blocks

    def spy_tokenize(lines, tokenizer):
        seen.append(sum(len(line.encode("utf-8")) + 1 for line in lines))
        return tokenize(lines, tokenizer)

    def spy_frame(pieces, start_id, end_id):
        written.append(len(pieces))
        return frame(pieces, start_id, end_id)

    monkeypatch.setattr(data, "tokenize_lines", spy_tokenize)
    monkeypatch.setattr(data, "frame_blocks", spy_frame)
    blocks = load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 128, tmp_path, show_progress=False)
    longest = max(len(line.encode("utf-8")) for line in
                  (WIKIPEDIA_SAMPLE / "valid.txt").read_text(encoding="utf-8").splitlines())
    assert len(seen) >= 351_447 // 50_000 and max(seen) <= 50_000 + longest + 1
    assert len(written) == len(seen) and sum(written) == len(blocks)
    assert sum(count > 0 for count in written) >= len(written) - 1


def test_progress_shows_megabytes_per_second_and_time_left(tokenizer, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.setattr(data, "interactive", lambda: True)  # as on a terminal: the bar
    load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 128, tmp_path, show_progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("tokenizing validation: 100%")][-1]
    # tqdm's "351k/351k [00:01<00:00, 297kB/s]": done/total bytes, elapsed<left, rate
    assert re.search(r" 351k/351k \[[\d:]+<[\d:]+, [\d.]+[kMG]?B/s\]$", final), final


def test_a_log_gets_a_line_when_the_build_starts_and_one_when_it_ends(tokenizer, tmp_path,
                                                                       capsys):
    # capsys's streams are not terminals: no bar, whose \r redraws would clutter a log file.
    load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 128, tmp_path, show_progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    assert re.fullmatch(r"tokenizing validation: \S+wikipedia-sample\S*, 0\.4 MB\n"
                        r"tokenizing validation: 571 blocks of 128 tokens in [\d.]+ s\n", err), err
    load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 128, tmp_path, show_progress=True)
    assert capsys.readouterr() == ("", "")  # read from the cache: nothing to report


def test_cache_file_name_says_its_format(tokenizer, tmp_path):
    load_blocks(WIKIPEDIA_SAMPLE, "valid", tokenizer, 128, tmp_path, show_progress=False)
    [cache] = tmp_path.glob("*.npy")
    assert re.fullmatch(rf"blocks-v{data.FORMAT_VERSION}-validation-128-[0-9a-f]{{20}}\.npy",
                        cache.name)
    assert data.FORMAT_VERSION >= 2  # 1: keyed by the decoded lines; 2: by the streamed bytes
    with open(cache, "rb") as file:
        version, shape, _ = (np.lib.format.read_magic(file),
                             *np.lib.format.read_array_header_1_0(file)[:2])
        assert version == (1, 0) and shape == (571, 128) and file.tell() % 64 == 0


def test_a_text_that_changes_while_it_is_read_is_not_cached(tokenizer, tmp_path, monkeypatch):
    file = write(tmp_path / "corpus" / "train.txt", [ARTEFACT_LINE] * 400)
    monkeypatch.setattr(splits, "CHUNK_BYTES", 4096)
    tokenize = data.tokenize_lines

    def edit_while_reading(lines, tokenizer):
        write(file, [ARTEFACT_LINE.replace("guest", "host")] * 400)  # same size, new text
        return tokenize(lines, tokenizer)

    monkeypatch.setattr(data, "tokenize_lines", edit_while_reading)
    with pytest.raises(MinibertError) as error:
        load_blocks(file.parent, "train", tokenizer, 16, tmp_path / "cache", show_progress=False)
    assert_one_line_error(error, str(file), "changed while it was being read")
    assert not list((tmp_path / "cache").glob("*.npy")) and not list(
        (tmp_path / "cache").glob(".*tmp*"))


KILLED_CHILD = """
import os, sys, time, types
from pathlib import Path
corpus, cache, marker, tokenizer_dir, package = map(Path, sys.argv[1:])
sys.modules["minibert"] = types.ModuleType("minibert")  # no torch: see CHILD below
sys.modules["minibert"].__path__ = [str(package)]
import minibert.data as data
import minibert.splits as splits
from minibert.tokenizer import load_tokenizer
splits.CHUNK_BYTES = 2000
frame, calls = data.frame_blocks, []
def frame_then_stall(*args):
    calls.append(1)
    if len(calls) == 20:  # some 40 kB of blocks written, more than the file's buffer holds
        marker.touch()
        time.sleep(600)  # killed here, in the middle of the build
    return frame(*args)
data.frame_blocks = frame_then_stall
data.load_blocks(corpus, "train", load_tokenizer(tokenizer_dir), 16, cache, show_progress=False)
"""


def test_a_build_killed_midway_leaves_no_cache_a_later_run_trusts(tokenizer, tmp_path):
    file = write(tmp_path / "corpus" / "train.txt", [ARTEFACT_LINE] * 3000)
    cache, marker = tmp_path / "cache", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(file.parent), str(cache),
                              str(marker), str(TOKENIZER_DIR), str(REPO / "minibert")],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, child.communicate()[1]
    [partial] = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert partial.stat().st_size > data.NPY_HEADER_BYTES
    child.kill()  # SIGKILL: no handler, no finally, no clean-up runs
    child.wait(timeout=30)
    assert not list(cache.glob("*.npy"))  # nothing under the name a later run looks for

    blocks = load_blocks(file.parent, "train", tokenizer, 16, cache, show_progress=False)
    assert np.array_equal(blocks, todays_blocks(tokenizer, [file], 16))
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # the leftover was tidied


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
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


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
        return datasets.Dataset.from_dict({"text": ["", ARTEFACT_LINE] * 10})

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
    assert_one_line_error(error_of(binary.parent), str(binary), "UTF-8", "byte 0")
    for bad_length in (2, 0, 12.0):
        assert_one_line_error(error_of(WIKIPEDIA_SAMPLE, "valid", bad_length), "max_seq_length",
                              ">= 3")
