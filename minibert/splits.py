"""Where the text of a corpus split comes from, read as a stream of lines in bounded memory.

`data` (the argument of load_blocks, `--data` of train.py and evaluate) is one of
- a WikiText name, "wikitext-2-raw-v1" or "wikitext-103-raw-v1", read with
  datasets.load_dataset("wikitext", name) from the HuggingFace hub or its cache. With
  HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1 only the cache is read; otherwise, when the hub
  cannot be reached, one line says so at once instead of the hub client's half-minute of
  retries;
- a folder holding each split as a file (wiki.train.raw or train.txt, wiki.valid.raw or
  valid.txt, wiki.test.raw or test.txt) or as a subfolder of text files (train/, valid/ or
  validation/, test/), looked for in that order;
- a dict {split: where}, each value a file, a folder of text files, or a glob
  ("shards/part-*.txt"; "**" matches subfolders too).
Splits are "train", "validation" ("valid" is accepted) and "test". A split that is not there
is an error that names the splits that are, never silently replaced by another.

The order of files. A folder's files are the regular files directly in it, hidden ones
(".name") left out; a glob's are the regular files it matches. Either way they are read in
the sorted order of their paths, compared as Python compares strings (by code point, the same
on every machine and file system): "part-10" comes before "part-9", so number shards with
leading zeros. The blocks therefore never depend on the order a file system lists a folder.

Reading. Each file is read in chunks of CHUNK_BYTES, decoded as UTF-8 and cut into lines
where str.splitlines cuts them ("\\n", "\\r\\n", "\\r" and the other Unicode line breaks); a
line cut by a chunk boundary is carried into the next chunk (a "\\r\\n" cut in two makes one
more empty line, dropped like every blank line). Memory is one chunk plus the longest line,
whatever the corpus size. The lines of one file never run into the next file's.

The content hash that names the cache (`SplitText.digest`) is streamed the same way, over
the raw bytes of each file in order, each followed by its length, so that a file boundary
counts. A hub split is hashed row by row, each row with its length. Hashing the
content itself rather than the files' names, sizes and times means that no edit, copy or
restore of a corpus can ever bring back blocks of another text; it costs one extra reading
of the corpus (about a second per GB), small beside tokenizing it.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from .errors import MinibertError

WIKITEXT_NAMES = ("wikitext-2-raw-v1", "wikitext-103-raw-v1")
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"valid": "validation"}
# What a folder may hold for each split, in the order looked for; a name ending in "/" is a
# subfolder of text files.
SPLIT_FILES = {"train": ("wiki.train.raw", "train.txt", "train/"),
               "validation": ("wiki.valid.raw", "valid.txt", "valid/", "validation/"),
               "test": ("wiki.test.raw", "test.txt", "test/")}
CHUNK_BYTES = 1 << 20  # bytes read, decoded and tokenized at a time
HUB_LINES_PER_CHUNK = 2000  # lines of a hub split read at a time
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub to answer before saying it cannot be reached
GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class SplitText:
    """The text of one split: its files in reading order, or the lines of a hub dataset."""

    name: str  # where the text comes from, for messages: a file, a folder or glob, a hub name
    files: tuple[Path, ...] = ()  # read in this order
    dataset: Any = None  # a datasets.Dataset with a "text" column (a WikiText hub split)

    def digest(self, *, show_progress: bool = False, desc: str = "hashing") -> tuple[bytes, int]:
        """(sha256 of the content, its size in bytes), streamed; see the module docstring."""
        hasher = hashlib.sha256()
        size = 0
        total = sum(f.stat().st_size for f in self.files) if self.files else None
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                  disable=not show_progress) as progress:
            if self.dataset is not None:
                parts = (data for _, data in self._hub_chunks(hasher))
            else:
                parts = (data for file in self.files for data in _file_chunks(file, hasher))
            for data in parts:
                size += len(data)
                progress.update(len(data))
        return hasher.digest(), size

    def line_chunks(self, hasher=None) -> Iterator[tuple[list[str], int]]:
        """(lines, bytes they came from) a chunk at a time, in order. The same bytes go into
        `hasher` as into `digest`, so a caller can check that what it read is what it hashed."""
        if self.dataset is not None:
            for lines, data in self._hub_chunks(hasher):
                yield lines, len(data)
            return
        for file in self.files:
            decoder = codecs.getincrementaldecoder("utf-8")()
            carry, offset = "", 0  # the start of a line that the chunk boundary cut
            for data in _file_chunks(file, hasher):
                pending = len(decoder.getstate()[0])  # bytes of a character the last chunk cut
                try:
                    text = carry + decoder.decode(data, final=not data)
                except UnicodeDecodeError as error:
                    raise MinibertError(f"{file}: cannot read as UTF-8 text (byte "
                                        f"{offset - pending + error.start}: {error.reason})"
                                        ) from None
                offset += len(data)
                lines = text.splitlines()
                # A last line without its line break may go on in the next chunk.
                carry = lines.pop() if data and text and not _ends_a_line(text[-1]) else ""
                yield lines, len(data)

    def _hub_chunks(self, hasher) -> Iterator[tuple[list[str], bytes]]:
        """(rows, the bytes hashed for them) of the hub dataset, HUB_LINES_PER_CHUNK at a time."""
        length = 0
        for batch in self.dataset.iter(batch_size=HUB_LINES_PER_CHUNK):
            lines = batch["text"]
            # A row is tokenized as one line even if it holds a line break, so each row is
            # hashed with its length: rows ["a\nb"] and ["a", "b"] must not share a key.
            data = b"".join(b"%d:%s" % (len(e), e) for e in (line.encode("utf-8")
                                                             for line in lines))
            length += len(data)
            if hasher is not None:
                hasher.update(data)
            yield lines, data
        if hasher is not None:
            hasher.update(b"\0%d\0" % length)


def _file_chunks(file: Path, hasher) -> Iterator[bytes]:
    """The bytes of `file`, CHUNK_BYTES at a time, then b"" at its end; every byte, then the
    file's length, goes into `hasher`."""
    length = 0
    try:
        with open(file, "rb") as stream:
            while data := stream.read(CHUNK_BYTES):
                length += len(data)
                if hasher is not None:
                    hasher.update(data)
                yield data
    except OSError as error:
        raise MinibertError(f"{file}: cannot read ({error.strerror or error})") from None
    if hasher is not None:
        hasher.update(b"\0%d\0" % length)
    yield b""


def _ends_a_line(character: str) -> bool:
    """Whether str.splitlines breaks a line at `character` ("\\n", "\\r", "\\x85", ...)."""
    return character.splitlines() != [character]


def normalize_split(split: str) -> str:
    """'train', 'validation' or 'test' ('valid' means 'validation')."""
    name = SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        raise MinibertError(f"unknown split {split!r}: use one of train, validation (or valid), "
                            f"test")
    return name


def check_splits(data: str | Path | dict, splits: tuple[str, ...] | list[str]) -> None:
    """Raise MinibertError unless every one of `splits` exists in `data`; reads no text, so
    that a run learns of a missing validation split before it tokenizes the training one.
    (A WikiText hub name has every split; whether it loads is known only when it is read.)"""
    for split in splits:
        split_files(data, normalize_split(split))


def available_splits(data: str | Path | dict) -> list[str]:
    """The splits that `data` holds, in SPLITS order (all of them for a hub name)."""
    found = []
    for split in SPLITS:
        try:
            split_files(data, split)
        except MinibertError:
            continue
        found.append(split)
    return found


def read_split(data: str | Path | dict, split: str) -> SplitText:
    """One split of `data`, ready to be hashed and read (a hub split is loaded here)."""
    found = split_files(data, split)
    if found is None:
        return SplitText(name=str(data), dataset=read_wikitext(str(data), split))
    where, files = found
    return SplitText(name=where, files=files)


def split_files(data: str | Path | dict, split: str) -> tuple[str, tuple[Path, ...]] | None:
    """(a short name of where the split is, its files in reading order), or None for a
    WikiText hub name. Reads no text."""
    if isinstance(data, dict):
        given = {normalize_split(name): where for name, where in data.items()}
        if split not in given:
            raise MinibertError(f"no {split} split among the files given "
                                f"(have: {', '.join(given) or 'none'})")
        return str(given[split]), files_of(given[split])
    folder = Path(data)
    if str(data) in WIKITEXT_NAMES and not folder.exists():  # a local folder of that name wins
        return None
    if not folder.exists():
        raise MinibertError(f"{folder}: no such folder, and not one of {', '.join(WIKITEXT_NAMES)}")
    if not folder.is_dir():
        raise MinibertError(f"{folder}: is a file; give a folder with "
                            f"{' or '.join(SPLIT_FILES[split])}, or a {{split: file}} mapping")
    for name in SPLIT_FILES[split]:
        if _holds(folder, name):
            return str(folder / name), files_of(folder / name)
    there = [s for s in SPLITS if any(_holds(folder, name) for name in SPLIT_FILES[s])]
    raise MinibertError(f"{folder}: no {split} split (looked for {', '.join(SPLIT_FILES[split])}); "
                        f"the splits there: {', '.join(there) or 'none'}")


def _holds(folder: Path, name: str) -> bool:
    """Whether `folder` holds the file `name`, or the subfolder `name` if it ends in "/"."""
    return (folder / name).is_dir() if name.endswith("/") else (folder / name).is_file()


def files_of(where: str | Path) -> tuple[Path, ...]:
    """The files of one split given as a file, a folder of text files, or a glob, in sorted
    order of their paths (see the module docstring)."""
    path = Path(where)
    if path.is_file():
        return (path,)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=str)
        if not files:
            raise MinibertError(f"{path}: a folder with no files in it")
        return tuple(files)
    if any(c in str(where) for c in GLOB_CHARACTERS):
        files = sorted((Path(p) for p in glob.glob(str(where), recursive=True)
                        if Path(p).is_file()), key=str)
        if not files:
            raise MinibertError(f"{where}: no file matches")
        return tuple(files)
    raise MinibertError(f"{path}: no such file")


def read_wikitext(name: str, split: str):
    """One split of WikiText from the HuggingFace hub or its local cache, as a
    datasets.Dataset (memory-mapped Arrow: reading it does not load it into memory)."""
    import datasets  # imported here: slow to import, and only this path needs it

    # datasets has read HF_DATASETS_OFFLINE and HF_HUB_OFFLINE (either turns it on).
    offline = getattr(datasets.config, "HF_HUB_OFFLINE", False)
    local = ("offline, pass a folder with wiki.train.raw, wiki.valid.raw, wiki.test.raw (or "
             "train.txt, valid.txt, test.txt) or a {split: file} mapping")
    if not offline and (reason := unreachable(datasets.config.HF_ENDPOINT)):
        raise MinibertError(f"cannot load {name}: the HuggingFace hub "
                            f"({datasets.config.HF_ENDPOINT}) cannot be reached ({reason}); "
                            f"set HF_DATASETS_OFFLINE=1 to read it from the HuggingFace cache "
                            f"if it is there, or, {local}")
    try:
        return datasets.load_dataset("wikitext", name, split=split)
    except Exception as error:  # offline without a cache it is a ConnectionError, among others
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        where = ("offline mode is on (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE) and the "
                 "HuggingFace cache does not hold it; " if offline else "")
        raise MinibertError(f"cannot load {name} ({reason}); {where}{local}") from None


def unreachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why a TCP connection to the hub's host cannot be made, or None if it can (or if a proxy
    stands between, which only the hub client knows how to use). One try, `timeout` seconds at
    most: the hub client retries a failed connection for about half a minute before it gives
    up, and a machine without network should hear so at once."""
    url = urllib.parse.urlsplit(endpoint)
    if not url.hostname or urllib.request.getproxies():
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return None
