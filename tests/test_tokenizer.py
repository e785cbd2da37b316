"""The tokenizers of the BERT family against transformers' fast tokenizers, and the one
definition of each family's special tokens that the corpus, masking and fill-mask read.

Reference: transformers' AutoTokenizer on the same files (RobertaTokenizer, BertTokenizer;
both backed by the tokenizers library, as minibert's are). Text: the WikiText-2 test split,
whole, as the file holds it (2,891 lines, 241k words: headings, numbers, " @-@ ", accents).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ASSETS, BERT_TINY
from minibert.data import load_blocks
from minibert.masking import special_token_ids, word_starts
from minibert.tokenizer import (BYTE_LEVEL_BPE, WORDPIECE, load_tokenizer, special_ids,
                                spelled_special_ids, tokenizer_family)

transformers = pytest.importorskip("transformers")
TOKENIZERS = ASSETS / "tokenizer"
WIKITEXT_TEST = ASSETS / "corpus" / "wikitext-2-raw" / "wiki.test.raw"
ROBERTA = TOKENIZERS / "roberta-base"


@pytest.fixture(scope="module")
def wikitext_lines() -> list[str]:
    return WIKITEXT_TEST.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("name", ["roberta-base", "bert-base-cased",
                                  "bert-base-multilingual-cased"])
def test_ids_equal_transformers_fast_tokenizer_on_wikitext2_test(name, wikitext_lines):
    reference = transformers.AutoTokenizer.from_pretrained(str(TOKENIZERS / name))
    assert reference.is_fast
    ours = load_tokenizer(TOKENIZERS / name)
    expected = reference(wikitext_lines)["input_ids"]
    got = [encoding.ids for encoding in ours.encode_batch(wikitext_lines)]
    differing = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    tokens = sum(map(len, got))
    print(f"{name}: {len(got)} lines, {tokens} tokens, {len(differing)} lines differ")
    assert len(got) == len(expected) == 2891 and tokens > 280_000
    assert not differing, f"line {differing[0] + 1} differs"


@pytest.mark.parametrize("name", ["roberta-base", "bert-base-cased"])
def test_pairs_special_tokens_and_decoding_as_transformers(name):
    """<s> A </s></s> B </s> and [CLS] A [SEP] B [SEP] (segment ids), special tokens typed in
    the text, <mask> taking the space before it, and decode."""
    reference = transformers.AutoTokenizer.from_pretrained(str(TOKENIZERS / name))
    ours = load_tokenizer(TOKENIZERS / name)
    pair = ours.encode("The first text.", "A second one")
    expected = reference("The first text.", "A second one")
    assert pair.ids == expected["input_ids"]
    if "token_type_ids" in expected:
        assert pair.type_ids == expected["token_type_ids"]
    for text in ("The capital of France is <mask>.", "Café [MASK] naïve </s><s> x [SEP]",
                 "  two  spaces, then 北京 and 😀"):
        assert ours.encode(text).ids == reference(text)["input_ids"], text
        ids = reference(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids), text


def test_cased_tokenizers_keep_case_and_accents():
    cased = load_tokenizer(TOKENIZERS / "bert-base-cased").encode("Café Zürich").tokens
    uncased = load_tokenizer(BERT_TINY).encode("Café Zürich").tokens
    assert cased[1] == "Café" and "Z" in cased[2]
    assert uncased[1:-1] == ["cafe", "zurich"]


def test_one_definition_of_each_familys_special_tokens():
    bert, roberta = load_tokenizer(BERT_TINY), load_tokenizer(ROBERTA)
    assert tokenizer_family(bert) is WORDPIECE and tokenizer_family(roberta) is BYTE_LEVEL_BPE
    ids = special_ids(roberta)
    assert (ids.start, ids.end, ids.pad, ids.unk, ids.mask) == (0, 2, 1, 3, 50264)
    ids = special_ids(bert)
    assert (ids.start, ids.end, ids.pad, ids.unk, ids.mask) == (101, 102, 0, 100, 103)
    # Masking never targets pad, start, end, mask; unk stays maskable (a real word).
    assert special_token_ids(roberta) == [1, 0, 2, 50264]
    assert special_token_ids(bert) == [0, 101, 102, 103]
    # What text must not produce: read as unk by the corpus, fill-mask and score.
    assert spelled_special_ids(roberta) == [0, 2, 1, 50264]
    assert spelled_special_ids(roberta, keep_mask=True) == [0, 2, 1]


def test_bpe_word_starts():
    """A word starts at a piece that begins with Ġ, or follows a special token."""
    tokenizer = load_tokenizer(ROBERTA)
    encoding = tokenizer.encode("Unbelievably, the <mask>ians won.")
    starts = word_starts(tokenizer, torch.tensor(encoding.ids)).tolist()
    pieces = [tokenizer.id_to_token(i) for i in encoding.ids]
    assert list(zip(pieces, starts)) == [
        ("<s>", True), ("Un", True), ("bel", False), ("iev", False), ("ably", False),
        (",", False), ("Ġthe", True), ("<mask>", True), ("ians", True), ("Ġwon", True),
        (".", False), ("</s>", True)]


def test_roberta_blocks_are_framed_by_its_own_tokens(tmp_path):
    """<s> ... </s> blocks; </s> typed in the text is read as <unk>."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("A line with </s> typed in it.\n" * 40, encoding="utf-8")
    tokenizer = load_tokenizer(ROBERTA)
    blocks = np.asarray(load_blocks(corpus, "train", tokenizer, max_seq_length=16,
                                    cache_dir=tmp_path / "cache", show_progress=False))
    assert (blocks[:, 0] == 0).all() and (blocks[:, -1] == 2).all()
    line = tokenizer.encode("A line with </s> typed in it.", add_special_tokens=False).ids
    assert 2 in line  # the tokenizer matches the typed </s> as the special token ...
    line[line.index(2)] = 3  # ... which the corpus reads as <unk>
    inner = blocks[:, 1:-1].flatten()
    assert inner.tolist() == (line * 40)[:len(inner)]
