"""Tokenizers of the BERT family, built with the `tokenizers` library from a folder's files.

    WordPiece (vocab.txt: BERT, DistilBERT, ELECTRA)
        text -> normalise (clean; lower-case and strip accents for uncased models)
             -> split on whitespace and punctuation -> WordPiece (longest match, "##" continues)
             -> [CLS] pieces [SEP]
    byte-level BPE (vocab.json + merges.txt: RoBERTa)
        text -> bytes as printable characters (a space becomes "Ġ", so it is part of the word
                after it) -> GPT-2's pre-tokenizer -> BPE merges -> <s> pieces </s>

`tokenizers` does this in Rust, batched over all cores; this module only assembles the same
pipelines that the checkpoints' own tokenizers use. Which special tokens a tokenizer has, and
how its pieces mark the start of a word, is `TokenizerFamily`: the corpus, masking,
fill-mask and scoring all read them from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from .errors import MinibertError


@dataclass(frozen=True)
class TokenizerFamily:
    """A tokenizer family's special tokens, by role, and how its pieces mark words."""

    start: str  # opens every sequence (BERT's [CLS])
    end: str  # closes it, and separates the two texts of a pair (BERT's [SEP])
    pad: str  # fills the short rows of a batch; attention never reads it
    unk: str  # stands for what the vocabulary cannot spell
    mask: str  # hides a masked-LM target
    word_marker: str  # "##" continues a word (WordPiece); "Ġ" starts one after a space (BPE)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (self.pad, self.unk, self.start, self.end, self.mask)

    def starts_word(self, piece: str) -> bool:
        """Whether a (non-special) piece begins a word: "play" but not "##ing" in WordPiece;
        "Ġplay" but not "ing" in byte-level BPE, where a word starts after a space. A BPE word
        at the start of a text has no "Ġ": it starts a word because it follows <s>."""
        if self.word_marker == "##":
            return not piece.startswith("##")
        return piece.startswith(self.word_marker)


WORDPIECE = TokenizerFamily(start="[CLS]", end="[SEP]", pad="[PAD]", unk="[UNK]", mask="[MASK]",
                            word_marker="##")  # BERT, DistilBERT, ELECTRA
BYTE_LEVEL_BPE = TokenizerFamily(start="<s>", end="</s>", pad="<pad>", unk="<unk>",
                                 mask="<mask>", word_marker="Ġ")  # RoBERTa


def tokenizer_family(tokenizer: Tokenizer) -> TokenizerFamily:
    """The family of a tokenizer built by load_tokenizer: BPE models are RoBERTa's."""
    return BYTE_LEVEL_BPE if isinstance(tokenizer.model, BPE) else WORDPIECE


@dataclass(frozen=True)
class SpecialIds:
    """The ids of a tokenizer's special tokens, by role (TokenizerFamily)."""

    start: int
    end: int
    pad: int
    unk: int
    mask: int

    def never_targets(self) -> list[int]:
        """pad, start, end and mask: never masked-LM targets, never random replacements.
        unk is left out: it stands for a real word of the text (minibert/masking.py)."""
        return [self.pad, self.start, self.end, self.mask]

    def not_from_text(self, keep_mask: bool = False) -> list[int]:
        """The ids that text must not produce: start, end, pad, and mask unless keep_mask.
        Text that spells one ("[SEP]", "</s>") is matched as that token itself, and an end
        token inside a sentence would cut it in two; the corpus, fill-mask and scoring read
        these ids as unk wherever the text produced them."""
        return [self.start, self.end, self.pad] + ([] if keep_mask else [self.mask])


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """The ids of the tokenizer's special tokens; MinibertError if one is missing."""
    family = tokenizer_family(tokenizer)
    ids = {role: tokenizer.token_to_id(getattr(family, role))
           for role in ("start", "end", "pad", "unk", "mask")}
    missing = [getattr(family, role) for role, index in ids.items() if index is None]
    if missing:
        raise MinibertError(f"the tokenizer has no {missing[0]} token")
    return SpecialIds(**ids)


def spelled_special_ids(tokenizer: Tokenizer, keep_mask: bool = False) -> list[int]:
    """SpecialIds.not_from_text of this tokenizer: what the text must not produce."""
    return special_ids(tokenizer).not_from_text(keep_mask)


def vocab_file(folder: Path) -> Path | None:
    """The vocabulary of a checkpoint folder: vocab.txt (WordPiece) or vocab.json (BPE)."""
    for name in ("vocab.txt", "vocab.json"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def read_vocab(file: Path) -> dict[str, int]:
    """vocab.txt (one token a line; the line number is the id) or vocab.json ({token: id})
    -> {token: id}, checked to hold the family's special tokens."""
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            vocab, family = json.loads(text), BYTE_LEVEL_BPE
        else:
            vocab, family = {t: i for i, t in enumerate(text.splitlines())}, WORDPIECE
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise MinibertError(f"{file}: cannot read vocabulary ({error})") from None
    missing = [t for t in family.special_tokens if t not in vocab]
    if missing:
        raise MinibertError(f"{file}: vocabulary lacks the special token {missing[0]}")
    return vocab


def tokenizer_settings(folder: Path) -> dict:
    """The settings of tokenizer_config.json that minibert reads (empty without the file):
    do_lower_case, strip_accents, tokenize_chinese_chars (WordPiece), add_prefix_space (BPE)."""
    file = Path(folder) / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise MinibertError(f"{file}: not valid JSON ({error})") from None
    return {k: config[k] for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars",
                                   "add_prefix_space") if config.get(k) is not None}


def is_lower_case(folder: Path, vocab: dict[str, int]) -> bool:
    """Whether text must be lower-cased: tokenizer_config.json says so, else the vocabulary
    tells (an uncased vocabulary has no upper-case word pieces outside [SPECIAL] tokens)."""
    value = tokenizer_settings(folder).get("do_lower_case")
    if value is not None:
        return bool(value)
    return not any(t.lower() != t for t in vocab if not (t.startswith("[") and t.endswith("]")))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of the checkpoint folder at `path` (minibert or HuggingFace): WordPiece
    from vocab.txt, or byte-level BPE from vocab.json and merges.txt.

    Encodings are framed by the family's start and end tokens: [CLS] A [SEP] and
    [CLS] A [SEP] B [SEP] (segment ids 0, then 1); <s> A </s> and <s> A </s></s> B </s>.
    `decode` joins the pieces back into words.
    """
    folder = Path(path)
    file = vocab_file(folder)
    if file is None:
        raise MinibertError(f"{folder}: no vocab.txt or vocab.json, so no tokenizer can be built")
    vocab = read_vocab(file)
    if file.name == "vocab.json":
        return _byte_level_bpe(folder, vocab)
    settings = tokenizer_settings(folder)
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents None follows lowercase, as in BERT: uncased models strip accents, cased
    # ones keep them; a tokenizer_config.json may say otherwise (multilingual uncased).
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"), lowercase=is_lower_case(folder, vocab))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Registered as special tokens, "[MASK]" and friends are matched in the raw text before
    # normalisation, so lower-casing cannot turn [MASK] into three word pieces.
    tokenizer.add_special_tokens(list(WORDPIECE.special_tokens))
    return tokenizer


def _byte_level_bpe(folder: Path, vocab: dict[str, int]) -> Tokenizer:
    """RoBERTa's tokenizer (GPT-2's byte-level BPE). Without merges.txt every character is
    a token of its own, as in a vocabulary of single residues or letters."""
    merges_file = folder / "merges.txt"
    merges = BPE.read_file(str(folder / "vocab.json"), str(merges_file))[1] \
        if merges_file.is_file() else []
    add_prefix_space = bool(tokenizer_settings(folder).get("add_prefix_space", False))
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True,
        add_prefix_space=add_prefix_space)
    family = BYTE_LEVEL_BPE
    # <mask> takes the space before it ("is <mask>." -> "is", "<mask>", "."), so the model
    # sees the masked word as the "Ġword" it learned: RoBERTa's own tokenizer does the same.
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in family.special_tokens
                                  if t != family.mask]
                                 + [AddedToken(family.mask, lstrip=True, normalized=False,
                                               special=True)])
    return tokenizer
