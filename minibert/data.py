"""The pre-training corpus: read a split, tokenize it, cut it into [CLS] ... [SEP] blocks, cache.

    tokenizer = minibert.load_tokenizer("../shared/assets/checkpoints/bert-tiny-splade-mlm")
    blocks = load_blocks("../shared/assets/corpus/wikipedia-sample", "train", tokenizer,
                         max_seq_length=128, cache_dir="cache")   # (num_blocks, 128) int32

`data` is one of
- a WikiText name, "wikitext-2-raw-v1" or "wikitext-103-raw-v1", read with
  datasets.load_dataset("wikitext", name): offline this works only when the HuggingFace cache
  already holds it (set HF_DATASETS_OFFLINE=1 to skip the hub's retries);
- a folder in the WikiText layout (wiki.train.raw, wiki.valid.raw, wiki.test.raw) or with
  train.txt, valid.txt, test.txt;
- a dict {split: file} of explicit files.
Splits are "train", "validation" ("valid" is accepted) and "test". A split that is not there
is an error, never silently replaced by another.

How text becomes blocks: empty lines are dropped, headings (" = Title = ") are kept as text,
WikiText's tokenization artefacts " @-@ ", " @,@ ", " @.@ " are joined back into "-", ",", "."
(unless join_wikitext_artifacts=False). The lines are tokenized without special tokens and
concatenated into one stream, as the paper's "contiguous sequences" of text. The stream is cut
into pieces of max_seq_length - 2 tokens, each framed as [CLS] piece [SEP]; only the last,
shorter piece of a split is dropped. Text that spells a special token literally ("[SEP]") is
read as [UNK], so [CLS] and [SEP] appear only at the two ends of a block.

The blocks are cached as a .npy file named by a hash of the corpus text, the tokenizer, the
block length and the options, and returned memory-mapped. Every torchrun rank may call
load_blocks at once: a file lock lets one process build the cache while the others wait for
it, however long that takes, then all of them load it. No process-group barrier is involved,
so the process group's timeout cannot fire during a long tokenization.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from .errors import MinibertError
from .safe_write import atomic_file, make_folder
from .tokenizer import spelled_special_ids

FORMAT_VERSION = 1  # bump when the way blocks are built changes, so old caches are not reused
WIKITEXT_NAMES = ("wikitext-2-raw-v1", "wikitext-103-raw-v1")
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"valid": "validation"}
# File names of each split in a local folder, in the order they are looked for.
SPLIT_FILES = {"train": ("wiki.train.raw", "train.txt"),
               "validation": ("wiki.valid.raw", "valid.txt"),
               "test": ("wiki.test.raw", "test.txt")}
WIKITEXT_ARTIFACTS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
LINES_PER_BATCH = 1000  # lines handed to encode_batch at a time; it spreads them over all cores


def load_blocks(data: str | Path | dict, split: str, tokenizer, max_seq_length: int,
                cache_dir: str | Path, *, join_wikitext_artifacts: bool = True,
                show_progress: bool = True) -> np.ndarray:
    """The (num_blocks, max_seq_length) int32 token ids of one split, memory-mapped from the
    cache in `cache_dir` (built first if needed). `tokenizer` is a `tokenizers.Tokenizer`."""
    if not isinstance(max_seq_length, int) or max_seq_length < 3:
        raise MinibertError(f"max_seq_length must be an integer >= 3 ([CLS], one token, [SEP]), "
                            f"got {max_seq_length!r}")
    split = normalize_split(split)
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if tokenizer.token_to_id(t) is None]
    if missing:
        raise MinibertError(f"the tokenizer has no {missing[0]} token, needed to frame blocks")
    source, lines = read_split(data, split)

    key = hashlib.sha256()
    for part in (f"minibert blocks v{FORMAT_VERSION}", tokenizer.to_str(), str(max_seq_length),
                 str(join_wikitext_artifacts)):
        key.update(part.encode("utf-8") + b"\0")
    for line in lines:
        key.update(line.encode("utf-8") + b"\n")
    cache_dir = Path(cache_dir)
    cache_file = cache_dir / f"blocks-{split}-{max_seq_length}-{key.hexdigest()[:20]}.npy"

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
                tokens = tokenize_lines(clean_lines(lines, join_wikitext_artifacts), tokenizer,
                                        desc=f"tokenizing {split}",
                                        show_progress=show_progress)
                blocks = cut_blocks(tokens, tokenizer, max_seq_length, f"{source} ({split})")
                write_atomically(cache_file, blocks)
        finally:
            lock.release()
    return np.load(cache_file, mmap_mode="r")


def corpus_stats(blocks: np.ndarray) -> dict:
    """Size of a split's blocks: count, block length and tokens of text (without [CLS]/[SEP])."""
    num_blocks, max_seq_length = blocks.shape
    return {"blocks": num_blocks, "max_seq_length": max_seq_length,
            "tokens": num_blocks * (max_seq_length - 2)}


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
        split_file(data, normalize_split(split))


def split_file(data: str | Path | dict, split: str) -> Path | None:
    """The file holding one split of `data`, or None for a WikiText hub name."""
    if isinstance(data, dict):
        files = {normalize_split(name): path for name, path in data.items()}
        if split not in files:
            raise MinibertError(f"no {split} split among the files given "
                                f"(have: {', '.join(files) or 'none'})")
        if not Path(files[split]).is_file():
            raise MinibertError(f"{files[split]}: no such file")
        return Path(files[split])
    folder = Path(data)
    if str(data) in WIKITEXT_NAMES and not folder.exists():  # a local folder of that name wins
        return None
    if not folder.exists():
        raise MinibertError(f"{folder}: no such folder, and not one of {', '.join(WIKITEXT_NAMES)}")
    if not folder.is_dir():
        raise MinibertError(f"{folder}: is a file; give a folder with "
                            f"{' or '.join(SPLIT_FILES[split])}, or a {{split: file}} mapping")
    for name in SPLIT_FILES[split]:
        if (folder / name).is_file():
            return folder / name
    raise MinibertError(f"{folder}: no {split} split (looked for "
                        f"{' and '.join(SPLIT_FILES[split])})")


def read_split(data: str | Path | dict, split: str) -> tuple[str, list[str]]:
    """(a short name of where the text came from, its raw lines) for one split of `data`."""
    file = split_file(data, split)
    if file is None:
        return str(data), read_wikitext(str(data), split)
    return str(file), read_lines(file)


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file."""
    if not path.is_file():
        raise MinibertError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MinibertError(f"{path}: cannot read as UTF-8 text ({error})") from None


def read_wikitext(name: str, split: str) -> list[str]:
    """The lines of one split of WikiText from the HuggingFace hub or its local cache."""
    import datasets  # imported here: slow to import, and only this path needs it

    try:
        dataset = datasets.load_dataset("wikitext", name, split=split)
    except Exception as error:  # offline without a cache it is a ConnectionError, among others
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MinibertError(
            f"cannot load {name} ({reason}); offline, pass a folder with wiki.train.raw, "
            f"wiki.valid.raw, wiki.test.raw (or train.txt, valid.txt, test.txt) or a "
            f"{{split: file}} mapping, or set HF_DATASETS_OFFLINE=1 to use the HF cache "
            f"without retrying the hub") from None
    return list(dataset["text"])  # datasets >= 4 returns a lazy Column


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


def tokenize_lines(lines: list[str], tokenizer, *, desc: str, show_progress: bool) -> np.ndarray:
    """Token ids of all lines, concatenated, without [CLS]/[SEP]: one int32 stream.

    Lines end at whitespace, so tokenizing them one by one gives the same word pieces as
    tokenizing the whole text at once, and encode_batch can spread the lines over all cores.
    """
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        # A copy that neither truncates nor pads: either would silently change the stream.
        tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    pieces = []
    with tqdm(total=len(lines), desc=desc, unit="lines", disable=not show_progress) as progress:
        for start in range(0, len(lines), LINES_PER_BATCH):
            batch = lines[start:start + LINES_PER_BATCH]
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                pieces.append(np.asarray(encoding.ids, dtype=np.int32))
            progress.update(len(batch))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    # Text that spells a special token ("[SEP]") is matched as that token; read it as [UNK].
    tokens[np.isin(tokens, spelled_special_ids(tokenizer))] = tokenizer.token_to_id("[UNK]")
    return tokens


def cut_blocks(tokens: np.ndarray, tokenizer, max_seq_length: int, source: str) -> np.ndarray:
    """Cut a token stream into (num_blocks, max_seq_length) blocks [CLS] piece [SEP]; every
    token lands in exactly one block except the final len(tokens) % (max_seq_length - 2)."""
    if len(tokens) == 0:
        raise MinibertError(f"{source}: the corpus is empty (no non-blank line)")
    piece_length = max_seq_length - 2
    num_blocks = len(tokens) // piece_length
    if num_blocks == 0:
        raise MinibertError(f"{source}: {len(tokens)} tokens, too short for one block of "
                            f"max_seq_length {max_seq_length} ([CLS] {piece_length} tokens [SEP])")
    blocks = np.empty((num_blocks, max_seq_length), dtype=np.int32)
    blocks[:, 0] = tokenizer.token_to_id("[CLS]")
    blocks[:, 1:-1] = tokens[:num_blocks * piece_length].reshape(num_blocks, piece_length)
    blocks[:, -1] = tokenizer.token_to_id("[SEP]")
    return blocks


def write_atomically(path: Path, array: np.ndarray) -> None:
    """Save `array` to `path` so that no reader ever sees a half-written file (a temporary
    beside it, fsynced, renamed over `path` in one step: minibert/safe_write.py)."""
    with atomic_file(path, needed=array.nbytes) as temporary, open(temporary, "wb") as file:
        np.save(file, array)
