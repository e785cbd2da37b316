"""Masking is a pure function: its statistics, its guarantees and its determinism."""

from pathlib import Path

import pytest
import torch

from minibert import load_tokenizer
from minibert.masking import (IGNORE_INDEX, make_masker, mask_batch, mask_tokens,
                              row_generator, special_token_ids, word_starts)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"

# bert-base-uncased ids: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103.
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = [PAD, CLS, SEP, MASK]
VOCAB_SIZE = 30522
ARGS = dict(mask_token_id=MASK, special_token_ids=SPECIAL, vocab_size=VOCAB_SIZE)


def blocks(num_rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    """(num_rows, seq) rows [CLS] word pieces [SEP], like the blocks of minibert.data."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(999, VOCAB_SIZE, (num_rows, seq), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids


def test_special_token_ids_of_the_real_tokenizer_leave_unk_maskable():
    tokenizer = load_tokenizer(ASSETS / "checkpoints" / "bert-tiny-splade-mlm")
    assert special_token_ids(tokenizer) == SPECIAL
    assert tokenizer.token_to_id("[UNK]") not in special_token_ids(tokenizer)


@pytest.mark.parametrize("batched", [False, True], ids=["mask_tokens", "mask_batch"])
def test_rate_and_80_10_10_split_on_many_tokens(batched):
    input_ids = blocks(4000 if not batched else 1000, 128)  # 504k / 126k maskable tokens
    if batched:
        inputs, labels = mask_batch(input_ids, range(len(input_ids)), seed=0, epoch=0, **ARGS)
    else:
        inputs, labels = mask_tokens(input_ids, generator=torch.Generator().manual_seed(0), **ARGS)
    maskable = input_ids.numel() - 2 * len(input_ids)
    assert maskable >= 100_000
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.sum().item() / maskable - 0.15) < 0.005
    assert torch.equal(labels[chosen], input_ids[chosen])
    num_chosen = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / num_chosen
    kept = (inputs[chosen] == input_ids[chosen]).sum().item() / num_chosen
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(replaced - 0.1) < 0.01 and abs(kept - 0.1) < 0.01
    assert torch.equal(inputs[~chosen], input_ids[~chosen])  # untouched outside targets


def test_special_and_padding_tokens_are_never_chosen_but_unk_is():
    input_ids = blocks(2000, 64)
    input_ids[:, 20:23] = torch.tensor([MASK, PAD, UNK])  # specials inside the text, and [UNK]
    input_ids[::2, 40:] = PAD  # padded rows
    inputs, labels = mask_tokens(input_ids, generator=torch.Generator().manual_seed(1), **ARGS)
    is_special = torch.isin(input_ids, torch.tensor(SPECIAL))
    assert (labels[is_special] == IGNORE_INDEX).all()
    assert torch.equal(inputs[is_special], input_ids[is_special])
    assert (labels[:, 22] == UNK).any()  # [UNK] is a word piece like the others


def test_random_replacements_are_never_special():
    # A vocabulary of 10 ids, 4 of them special: a bug would show up quickly.
    input_ids = torch.randint(4, 10, (5000, 20), generator=torch.Generator().manual_seed(2))
    inputs, labels = mask_tokens(input_ids, mask_token_id=3, special_token_ids=[0, 1, 2, 3],
                                 vocab_size=10, mask_ratio=0.0, random_ratio=1.0,
                                 generator=torch.Generator().manual_seed(2))
    replaced = inputs[labels != IGNORE_INDEX]
    assert set(replaced.tolist()) == {4, 5, 6, 7, 8, 9}
    # The same on the real vocabulary size.
    inputs, labels = mask_tokens(blocks(500, 128), mask_ratio=0.0, random_ratio=1.0,
                                 generator=torch.Generator().manual_seed(3), **ARGS)
    replaced = inputs[labels != IGNORE_INDEX]
    assert not torch.isin(replaced, torch.tensor(SPECIAL)).any()
    assert replaced.min() >= 0 and replaced.max() < VOCAB_SIZE


def test_every_sequence_gets_a_target_even_three_tokens_long():
    for seed in range(200):
        inputs, labels = mask_tokens(torch.tensor([[CLS, 2023, SEP]]),
                                     generator=torch.Generator().manual_seed(seed), **ARGS)
        assert labels.tolist() == [[IGNORE_INDEX, 2023, IGNORE_INDEX]]
        assert inputs[0, 0] == CLS and inputs[0, 2] == SEP
    # Short and padded rows in one batch: each gets max(1, round(0.15 n)) targets.
    input_ids = torch.full((4, 16), PAD)
    for row, n in enumerate([1, 3, 10, 14]):
        input_ids[row, :n + 2] = torch.tensor([CLS] + [2000 + i for i in range(n)] + [SEP])
    _, labels = mask_tokens(input_ids, generator=torch.Generator().manual_seed(0), **ARGS)
    assert (labels != IGNORE_INDEX).sum(dim=1).tolist() == [1, 1, 2, 2]
    # A row with nothing to mask gets no target instead of an error.
    _, labels = mask_tokens(torch.tensor([[CLS, SEP, PAD]]), **ARGS)
    assert (labels == IGNORE_INDEX).all()


def test_same_seed_same_masks_and_input_untouched():
    input_ids = blocks(64, 128)
    before = input_ids.clone()
    first = mask_tokens(input_ids, generator=torch.Generator().manual_seed(7), **ARGS)
    second = mask_tokens(input_ids, generator=torch.Generator().manual_seed(7), **ARGS)
    other = mask_tokens(input_ids, generator=torch.Generator().manual_seed(8), **ARGS)
    assert torch.equal(input_ids, before)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    assert first[0].dtype == first[1].dtype == torch.long
    # int32 blocks (as load_blocks returns) and a single (seq,) row are accepted.
    row = mask_tokens(input_ids[0].int(), generator=torch.Generator().manual_seed(7), **ARGS)
    assert row[0].shape == (128,)


def test_mask_batch_is_world_size_invariant():
    input_ids = blocks(12, 128)
    indices = torch.arange(100, 112)
    one_process = mask_batch(input_ids, indices, seed=5, epoch=3, **ARGS)
    # Two processes: rank r takes rows r, r + 2, ... (a DistributedSampler's interleaving).
    for rank in (0, 1):
        inputs, labels = mask_batch(input_ids[rank::2], indices[rank::2], seed=5, epoch=3, **ARGS)
        assert torch.equal(inputs, one_process[0][rank::2])
        assert torch.equal(labels, one_process[1][rank::2])
    # Nor does the batch composition matter: a row alone is masked as in its batch.
    alone = mask_batch(input_ids[7:8], [107], seed=5, epoch=3, **ARGS)
    assert torch.equal(alone[1][0], one_process[1][7])
    # A row is masked exactly like mask_tokens with that row's generator.
    tokens = mask_tokens(input_ids[7], generator=row_generator(5, 3, 107), **ARGS)
    assert torch.equal(tokens[0], one_process[0][7]) and torch.equal(tokens[1], one_process[1][7])


def test_mask_batch_changes_with_epoch_and_is_fixed_for_evaluation():
    input_ids = blocks(8, 128)
    epoch_0 = mask_batch(input_ids, range(8), seed=0, epoch=0, **ARGS)
    again = mask_batch(input_ids, range(8), seed=0, epoch=0, **ARGS)
    epoch_1 = mask_batch(input_ids, range(8), seed=0, epoch=1, **ARGS)
    other_seed = mask_batch(input_ids, range(8), seed=1, epoch=0, **ARGS)
    assert torch.equal(epoch_0[1], again[1])
    assert not torch.equal(epoch_0[1], epoch_1[1])
    assert not torch.equal(epoch_0[1], other_seed[1])


@pytest.mark.parametrize("change, message", [
    (dict(mlm_probability=0.0), "mlm_probability"),
    (dict(mask_ratio=0.9, random_ratio=0.2), "sum to at most 1"),
    (dict(mask_token_id=VOCAB_SIZE), "outside the vocabulary"),
])
def test_bad_arguments(change, message):
    with pytest.raises(ValueError, match=message):
        mask_tokens(blocks(2, 8), **{**ARGS, **change})
    with pytest.raises(ValueError, match="integer token ids"):
        mask_tokens(blocks(2, 8).float(), **ARGS)
    with pytest.raises(ValueError, match="sequence indices"):
        mask_batch(blocks(2, 8), [0], seed=0, epoch=0, **ARGS)


# ---------------------------------------------------------------------------------------------
# word boundaries


def test_word_starts_mark_the_first_piece_of_every_word():
    tokenizer = load_tokenizer(ASSETS / "checkpoints" / "bert-tiny-splade-mlm")
    encoding = tokenizer.encode("Tokenization of unbelievably long words [MASK] works.")
    starts = word_starts(tokenizer, torch.tensor(encoding.ids))
    pieces = [(token, bool(start)) for token, start in zip(encoding.tokens, starts)]
    continuing = [token for token, start in pieces if not start]
    assert continuing == ["##ization", "##bel", "##ie", "##va", "##bly"]
    assert all(token.startswith("##") for token in continuing)
    assert all(start for token, start in pieces if token.startswith("["))  # specials: own words


def test_word_starts_of_a_block_cut_inside_a_word_and_of_a_batch():
    tokenizer = load_tokenizer(ASSETS / "checkpoints" / "bert-tiny-splade-mlm")
    ids = [tokenizer.token_to_id(t) for t in ("[CLS]", "##ing", "##s", "play", "##ing", "[SEP]")]
    batch = torch.tensor([ids, ids])  # (2, 6): the function keeps the shape
    expected = [True, True, False, True, False, True]  # "##ing" after [CLS] starts a word
    assert word_starts(tokenizer, batch).tolist() == [expected, expected]


def test_make_masker_is_mask_batch_with_the_tokenizer_filled_in():
    tokenizer = load_tokenizer(ASSETS / "checkpoints" / "bert-tiny-splade-mlm")
    mask = make_masker(tokenizer, vocab_size=VOCAB_SIZE, mlm_probability=0.2)
    input_ids = blocks(4, 64)
    by_masker = mask(input_ids, [5, 6, 7, 8], seed=1, epoch=2)
    by_hand = mask_batch(input_ids, [5, 6, 7, 8], seed=1, epoch=2, mlm_probability=0.2, **ARGS)
    assert all(torch.equal(a, b) for a, b in zip(by_masker, by_hand))


# ---------------------------------------------------------------------------------------------
# whole-word masking


@pytest.fixture(scope="module")
def real_blocks():
    """(rows, 128) blocks [CLS] ... [SEP] of the real Wikipedia validation text
    (~72k maskable) and the tokenizer: real words, many split into several pieces."""
    tokenizer = load_tokenizer(ASSETS / "checkpoints" / "bert-tiny-splade-mlm")
    text = (ASSETS / "corpus" / "wikipedia-sample" / "valid.txt").read_text(encoding="utf-8")
    ids = [i for encoding in tokenizer.encode_batch(text.splitlines(), add_special_tokens=False)
           for i in encoding.ids]
    rows = torch.tensor(ids[:len(ids) // 126 * 126]).view(-1, 126)
    cls, sep = torch.full((len(rows), 1), CLS), torch.full((len(rows), 1), SEP)
    return torch.cat([cls, rows, sep], dim=1), tokenizer


def word_index(starts: torch.Tensor) -> torch.Tensor:
    """(batch, seq) index of each piece's word within its row."""
    return starts.long().cumsum(dim=1) - 1


def test_whole_word_masks_of_real_text_never_split_a_word(real_blocks):
    input_ids, tokenizer = real_blocks
    starts = word_starts(tokenizer, input_ids)
    inputs, labels = mask_batch(input_ids, range(len(input_ids)), seed=0, epoch=0,
                                word_starts=starts, **ARGS)
    chosen = labels != IGNORE_INDEX
    words = word_index(starts)
    multi_piece_words_chosen = 0
    for row in range(len(input_ids)):
        # Per word: how many pieces, how many chosen. A word is all chosen or not at all.
        pieces = torch.bincount(words[row])
        chosen_pieces = torch.bincount(words[row], weights=chosen[row].double()).long()
        assert ((chosen_pieces == 0) | (chosen_pieces == pieces)).all(), row
        multi_piece_words_chosen += int(((chosen_pieces == pieces) & (pieces > 1)).sum())
    assert multi_piece_words_chosen > 500  # the check above was not vacuous

    # Rate 15% +- 1% of the maskable pieces; 80/10/10 within 1.5%; specials never targets.
    is_special = torch.isin(input_ids, torch.tensor(SPECIAL))
    assert not chosen[is_special].any()
    maskable = (~is_special).sum().item()
    assert maskable > 70_000
    assert abs(chosen.sum().item() / maskable - 0.15) < 0.01
    num_chosen = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / num_chosen
    kept = (inputs[chosen] == input_ids[chosen]).sum().item() / num_chosen
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.015 and abs(replaced - 0.1) < 0.015 and abs(kept - 0.1) < 0.015
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(inputs[~chosen], input_ids[~chosen])


def test_whole_word_budget_skips_a_word_that_would_overshoot(real_blocks):
    input_ids, tokenizer = real_blocks
    starts = word_starts(tokenizer, input_ids)
    _, labels = mask_batch(input_ids, range(len(input_ids)), seed=1, epoch=0,
                           word_starts=starts, **ARGS)
    budget = torch.round((input_ids.shape[1] - 2) * torch.tensor(0.15)).long()
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    # A long word is skipped for a shorter one, so real text meets the budget exactly (a
    # greedy pick that stopped at the first overshoot would fall short in most rows).
    assert (counts == budget).all(), counts.tolist()

    # Budget 1 (4 maskable pieces): "playing##s" never fits, "the" always does.
    ids = torch.tensor([[CLS] + [tokenizer.token_to_id(t) for t in ("play", "##ing", "##s",
                                                                     "the")] + [SEP]])
    starts = word_starts(tokenizer, ids)
    for seed in range(50):
        _, labels = mask_tokens(ids, generator=torch.Generator().manual_seed(seed),
                                word_starts=starts, **ARGS)
        assert labels[0].tolist() == [IGNORE_INDEX] * 4 + [ids[0, 4].item(), IGNORE_INDEX]
    # Budget 1, and the only word has 3 pieces: it is taken whole (every row keeps a target).
    ids = ids[:, [0, 1, 2, 3, 5]]
    _, labels = mask_tokens(ids, word_starts=word_starts(tokenizer, ids), **ARGS)
    assert labels[0, 1:4].tolist() == ids[0, 1:4].tolist()


def test_whole_word_masks_depend_on_seed_epoch_and_index_only(real_blocks):
    input_ids, tokenizer = real_blocks
    input_ids = input_ids[:12]
    indices = torch.arange(100, 112)
    mask = make_masker(tokenizer, vocab_size=VOCAB_SIZE, whole_word_mask=True)
    one_process = mask(input_ids, indices, seed=5, epoch=3)
    by_hand = mask_batch(input_ids, indices, seed=5, epoch=3,
                         word_starts=word_starts(tokenizer, input_ids), **ARGS)
    assert all(torch.equal(a, b) for a, b in zip(one_process, by_hand))
    for rank in (0, 1):  # two processes, rows interleaved
        inputs, labels = mask(input_ids[rank::2], indices[rank::2], seed=5, epoch=3)
        assert torch.equal(inputs, one_process[0][rank::2])
        assert torch.equal(labels, one_process[1][rank::2])
    row = mask_tokens(input_ids[7], generator=row_generator(5, 3, 107),
                      word_starts=word_starts(tokenizer, input_ids[7]), **ARGS)
    assert torch.equal(row[0], one_process[0][7]) and torch.equal(row[1], one_process[1][7])
    assert not torch.equal(mask(input_ids, indices, seed=5, epoch=4)[1], one_process[1])
    # Without whole_word_mask the masker is token-level masking, unchanged.
    token_level = make_masker(tokenizer, vocab_size=VOCAB_SIZE)(input_ids, indices, seed=5,
                                                                 epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(
        token_level, mask_batch(input_ids, indices, seed=5, epoch=3, **ARGS)))
    with pytest.raises(ValueError, match="word_starts"):
        mask_batch(input_ids, indices, seed=5, epoch=3, word_starts=torch.ones(3, 3).bool(),
                   **ARGS)
