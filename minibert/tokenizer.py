"""BERT's WordPiece tokenizer, built with the `tokenizers` library from a folder's vocab.txt.

    text -> normalise (clean, strip accents, lower-case for uncased models)
         -> split on whitespace and punctuation -> WordPiece (longest match, "##" continuations)
         -> [CLS] pieces [SEP]

`tokenizers` does this in Rust, batched over all cores; this module only assembles the same
pipeline that bert-base-uncased's own tokenizer uses.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from .errors import MinibertError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def read_vocab(vocab_file: Path) -> dict[str, int]:
    """vocab.txt (one token a line; the line number is the id) -> {token: id}."""
    try:
        tokens = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MinibertError(f"{vocab_file}: cannot read vocabulary ({error})") from None
    vocab = {token: index for index, token in enumerate(tokens)}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise MinibertError(f"{vocab_file}: vocabulary lacks the special token {missing[0]}")
    return vocab


def is_lower_case(folder: Path, vocab: dict[str, int]) -> bool:
    """Whether text must be lower-cased: tokenizer_config.json says so, else the vocabulary
    tells (an uncased vocabulary has no upper-case word pieces outside [SPECIAL] tokens)."""
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        value = json.loads(config_file.read_text()).get("do_lower_case")
        if value is not None:
            return bool(value)
    return not any(t.lower() != t for t in vocab if not (t.startswith("[") and t.endswith("]")))


def spelled_special_ids(tokenizer: Tokenizer, keep_mask: bool = False) -> list[int]:
    """Ids of the special tokens that text must not produce: [PAD], [CLS], [SEP], and [MASK]
    unless keep_mask. Text that spells one ("[SEP]") is matched as that token itself, and a
    [SEP] inside a sentence would cut it in two; the corpus, fill-mask and scoring all read
    these ids as [UNK] wherever the text produced them."""
    names = ("[PAD]", "[CLS]", "[SEP]") + (() if keep_mask else ("[MASK]",))
    return [i for i in map(tokenizer.token_to_id, names) if i is not None]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A WordPiece tokenizer for the checkpoint folder at `path` (minibert or HuggingFace).

    Encodings add [CLS] ... [SEP] (and [SEP] between the two texts of a pair, with segment
    ids 0 then 1); `decode` joins "##" pieces back into words.
    """
    folder = Path(path)
    vocab_file = folder / "vocab.txt"
    if not vocab_file.is_file():
        raise MinibertError(f"{folder}: no vocab.txt, so no tokenizer can be built")
    vocab = read_vocab(vocab_file)
    lower_case = is_lower_case(folder, vocab)

    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Registered as special tokens, "[MASK]" and friends are matched in the raw text before
    # normalisation, so lower-casing cannot turn [MASK] into three word pieces.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
