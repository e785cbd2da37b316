"""The pre-training corpus: a split's text, tokenized as a stream into [CLS] ... [SEP] blocks,
cached on disk.

    tokenizer = minibert.load_tokenizer("../shared/assets/checkpoints/bert-tiny-splade-mlm")
    blocks = load_blocks("../shared/assets/corpus/wikipedia-sample", "train", tokenizer,
                         max_seq_length=128, cache_dir="cache")   # (num_blocks, 128) int32

What `data` may be (a WikiText hub name, a folder, a {split: file, folder or glob} mapping),
and in which order a split's files are read: minibert/splits.py.

How text becomes blocks: empty lines are dropped, headings (" = Title = ") are kept as text,
WikiText's tokenization artefacts " @-@ ", " @,@ ", " @.@ " are joined back into "-", ",", "."
(unless join_wikitext_artifacts=False). The lines are tokenized without special tokens and
concatenated into one stream, as the paper's "contiguous sequences" of text. The stream is cut
into pieces of max_seq_length - 2 tokens, each framed as [CLS] piece [SEP]; only the last,
shorter piece of a split is dropped. Text that spells a special token literally ("[SEP]") is
read as [UNK], so [CLS] and [SEP] appear only at the two ends of a block.

A stream, in bounded memory. The text is read a chunk at a time (splits.CHUNK_BYTES, a few
thousand lines); each chunk's lines are tokenized together with encode_batch (all cores), and
every full piece of the stream is framed and appended to the cache file at once, so only the
tokens of the unfinished piece wait for the next chunk. Memory is that of one chunk, whatever
the corpus size, and time grows linearly with it. The blocks are bit for bit those of reading
the whole split at once: lines end at whitespace and are tokenized one by one either way.

The cache is a .npy file, blocks-v{FORMAT_VERSION}-{split}-{max_seq_length}-{key}.npy, returned
memory-mapped. The version in the name says how the file was built and keyed, so a file of
another version is never read as this one; the key hashes the text's content (streamed:
splits.SplitText.digest), the tokenizer, the block length and the options. The file is written
under a temporary name beside its own (minibert/safe_write.py), its header rewritten once the
number of blocks is known, and renamed into place only when it is complete and the text read
while tokenizing is the text that was hashed. A build that is interrupted (Ctrl-C, kill -9, a
power cut) leaves no file of that name, so no later run trusts a half-written cache. Every
torchrun rank may call load_blocks at once: a file lock lets one process build the cache while
the others wait for it, however long that takes, then all of them load it. No process-group
barrier is involved, so the process group's timeout cannot fire during a long tokenization.
"""

from __future__ import annotations

import hashlib
import time
from itertools import chain
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from .errors import MinibertError
from .progress import interactive, say
from .safe_write import atomic_file
from .splits import (SplitText, available_splits, check_splits,  # noqa: F401 (re-exported)
                     normalize_split, read_split)
from .tokenizer import special_ids, spelled_special_ids
from .write_errors import make_folder

FORMAT_VERSION = 2  # bump when the blocks or their key change (2: content hashed as a stream)
WIKITEXT_ARTIFACTS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
NPY_HEADER_BYTES = 128  # the cache file's header: room for any (num_blocks, max_seq_length)


def load_blocks(data: str | Path | dict, split: str, tokenizer, max_seq_length: int,
                cache_dir: str | Path, *, join_wikitext_artifacts: bool = True,
                show_progress: bool = True) -> np.ndarray:
    """The (num_blocks, max_seq_length) int32 token ids of one split, memory-mapped from the
    cache in `cache_dir` (built first if needed). `tokenizer` is a `tokenizers.Tokenizer`.
    show_progress: bars on a terminal; where the output is not one, a line on stderr when a
    build starts and one when it ends (minibert/progress.py)."""
    if not isinstance(max_seq_length, int) or max_seq_length < 3:
        raise MinibertError(f"max_seq_length must be an integer >= 3 ([CLS], one token, [SEP]), "
                            f"got {max_seq_length!r}")
    split = normalize_split(split)
    block_special_ids(tokenizer)  # a tokenizer that cannot frame blocks fails before any reading
    text = read_split(data, split)
    content, size = text.digest(show_progress=show_progress and interactive(),
                                desc=f"hashing {split}")

    key = hashlib.sha256()
    for part in (f"minibert blocks v{FORMAT_VERSION}", tokenizer.to_str(), str(max_seq_length),
                 str(join_wikitext_artifacts)):
        key.update(part.encode("utf-8") + b"\0")
    key.update(content)
    cache_dir = Path(cache_dir)
    cache_file = (cache_dir / f"blocks-v{FORMAT_VERSION}-{split}-{max_seq_length}-"
                              f"{key.hexdigest()[:20]}.npy")

    if not cache_file.is_file():
        make_folder(cache_dir, "cache_dir")
        lock = FileLock(str(cache_file) + ".lock")
        try:
            lock.acquire()
        except OSError as error:  # a folder we may not write in
            raise MinibertError(f"cache_dir {cache_dir}: cannot write there "
                                f"({error.strerror or error})") from None
        try:
            # Whoever held the lock before us may have built it while we waited.
            if not cache_file.is_file():
                # needed: int32 ids, one per WordPiece token of about 4 characters of English,
                # so about the size of the text (for the message of a full disk)
                with atomic_file(cache_file, needed=size) as temporary:
                    write_blocks(text, temporary, tokenizer, max_seq_length,
                                 join_wikitext_artifacts=join_wikitext_artifacts,
                                 content=content, size=size, source=f"{text.name} ({split})",
                                 desc=f"tokenizing {split}", show_progress=show_progress)
        finally:
            lock.release()
    return np.load(cache_file, mmap_mode="r")


def corpus_stats(blocks: np.ndarray) -> dict:
    """Size of a split's blocks: count, block length and tokens of text (without [CLS]/[SEP])."""
    num_blocks, max_seq_length = blocks.shape
    return {"blocks": num_blocks, "max_seq_length": max_seq_length,
            "tokens": num_blocks * (max_seq_length - 2)}


def clean_lines(lines: list[str], join_wikitext_artifacts: bool) -> list[str]:
    """Drop empty lines, strip the others, and join WikiText's artefacts back if asked."""
    cleaned = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if join_wikitext_artifacts:
            for artefact, joined in WIKITEXT_ARTIFACTS:
                line = line.replace(artefact, joined)
        cleaned.append(line)
    return cleaned


def write_blocks(text: SplitText, path: Path, tokenizer, max_seq_length: int, *,
                 join_wikitext_artifacts: bool, content: bytes, size: int, source: str,
                 desc: str, show_progress: bool) -> int:
    """Tokenize `text` as a stream into the .npy file `path`, (num_blocks, max_seq_length) int32
    blocks, and return num_blocks. `content` and `size` are `text.digest()`: a text that reads
    differently now is an error (the caller's atomic write then keeps nothing)."""
    start_id, end_id, _ = block_special_ids(tokenizer)
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        # A copy that neither truncates nor pads: either would silently change the stream.
        tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    piece_length = max_seq_length - 2
    hasher = hashlib.sha256()
    carry = np.zeros(0, dtype=np.int32)  # tokens of the piece that the next chunk completes
    num_blocks = 0
    bar = show_progress and interactive()  # else, in a log, a line at the start and the end
    if show_progress and not bar:
        say(f"{desc}: {text.name}, {size / 1e6:.1f} MB")
    started = time.perf_counter()
    with open(path, "wb") as file, tqdm(total=size, desc=desc, unit="B", unit_scale=True,
                                        disable=not bar) as progress:
        file.write(npy_header((0, max_seq_length)))  # rewritten below with the real count
        for lines, num_bytes in text.line_chunks(hasher):
            tokens = tokenize_lines(clean_lines(lines, join_wikitext_artifacts), tokenizer)
            stream = np.concatenate([carry, tokens])
            count = len(stream) // piece_length
            pieces = stream[:count * piece_length].reshape(count, piece_length)
            file.write(frame_blocks(pieces, start_id, end_id).data)
            num_blocks += count
            carry = stream[count * piece_length:].copy()
            progress.update(num_bytes)
        if hasher.digest() != content:
            raise MinibertError(f"{source}: the text changed while it was being read; run again "
                                f"once nothing writes to it")
        if num_blocks == 0 and len(carry) == 0:
            raise MinibertError(f"{source}: the corpus is empty (no non-blank line)")
        if num_blocks == 0:
            raise MinibertError(f"{source}: {len(carry)} tokens, too short for one block of "
                                f"max_seq_length {max_seq_length} ([CLS] {piece_length} tokens "
                                f"[SEP])")
        file.seek(0)
        file.write(npy_header((num_blocks, max_seq_length)))
    if show_progress and not bar:
        say(f"{desc}: {num_blocks:,} blocks of {max_seq_length} tokens in "
            f"{time.perf_counter() - started:.1f} s")
    return num_blocks


def tokenize_lines(lines: list[str], tokenizer) -> np.ndarray:
    """Token ids of `lines`, concatenated, without [CLS]/[SEP]: an int32 stream.

    Lines end at whitespace, so tokenizing them one by one gives the same word pieces as
    tokenizing the whole text at once, and encode_batch can spread the lines over all cores.
    (Byte-level BPE, where a space belongs to the next word, starts each line without one,
    as RoBERTa's own preprocessing encodes line by line.)
    (encode_batch_fast: the same ids, without the character offsets nobody reads here.)
    """
    encodings = tokenizer.encode_batch_fast(lines, add_special_tokens=False) if lines else []
    tokens = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32)
    # Text that spells a special token ("[SEP]") is matched as that token; read it as [UNK].
    tokens[np.isin(tokens, spelled_special_ids(tokenizer))] = block_special_ids(tokenizer)[2]
    return tokens


def block_special_ids(tokenizer) -> tuple[int, int, int]:
    """(start, end, unknown): the ids of the family's [CLS] and [SEP] (RoBERTa's <s> and </s>),
    which open and close every block, and of [UNK] (<unk>), which stands for text that spells a
    special token."""
    ids = special_ids(tokenizer)  # MinibertError if the tokenizer lacks one
    return ids.start, ids.end, ids.unk


def frame_blocks(pieces: np.ndarray, start_id: int, end_id: int) -> np.ndarray:
    """(num_blocks, piece_length) tokens -> (num_blocks, piece_length + 2) little-endian int32
    blocks, each start_id piece end_id."""
    num_blocks, piece_length = pieces.shape
    blocks = np.empty((num_blocks, piece_length + 2), dtype="<i4")
    blocks[:, 0] = start_id
    blocks[:, 1:-1] = pieces
    blocks[:, -1] = end_id
    return blocks


def npy_header(shape: tuple[int, int]) -> bytes:
    """A .npy header (format 1.0, numpy.lib.format) for C-ordered little-endian int32 data of
    `shape`, always NPY_HEADER_BYTES long, so that the blocks can be appended after it as they
    come and the header rewritten in place once their number is known."""
    fields = repr({"descr": "<i4", "fortran_order": False, "shape": tuple(shape)})
    header = fields.encode("latin1").ljust(NPY_HEADER_BYTES - 11) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def write_atomically(path: Path, array: np.ndarray) -> None:
    """Save `array` to `path` so that no reader ever sees a half-written file (a temporary
    beside it, fsynced, renamed over `path` in one step: minibert/safe_write.py)."""
    with atomic_file(path, needed=array.nbytes) as temporary, open(temporary, "wb") as file:
        np.save(file, array)
