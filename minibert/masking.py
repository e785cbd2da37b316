"""Masked-LM masking, exactly as BERT pre-training does it (Devlin et al. 2018, section 3.1).

    special = special_token_ids(tokenizer)                   # [PAD], [CLS], [SEP], [MASK]
    inputs, labels = mask_batch(input_ids, sequence_indices, seed=0, epoch=epoch,
                                mask_token_id=special_ids(tokenizer).mask,
                                special_token_ids=special, vocab_size=tokenizer.get_vocab_size())

In every sequence, 15% of the tokens that are not special are chosen as prediction targets.
Of the chosen tokens 80% become [MASK], 10% a random token and 10% stay as they are. `labels`
holds the original id at chosen positions and -100 (F.cross_entropy's ignore_index) elsewhere.

Decisions:
- Each sequence gets exactly max(1, round(mlm_probability * n)) targets among its n maskable
  tokens, as the original create_pretraining_data.py does, rather than a coin flip per token:
  every sequence has at least one target, so the loss is never 0/0 = NaN.
- [UNK] is maskable like any word piece, as in the original code (which skips only [CLS] and
  [SEP]): it stands for a real word of the text. So `special_token_ids(tokenizer)` returns
  [PAD], [CLS], [SEP] and [MASK]; add [UNK]'s id yourself if it must never be a target.
  Random replacements are drawn uniformly from every id below vocab_size that is not special.
- Whole-word masking (`word_starts=...`, make_masker(..., whole_word_mask=True)), the
  masking of Google's later *-whole-word-masking checkpoints: a word split into pieces
  ("phil ##am ##mon") is a target as a whole or not at all, so the model cannot guess
  "##am" from "phil" and "##mon" alone. Whole words are drawn until the row's budget of
  round(p * n) pieces is met; 80/10/10 is then applied to each piece on its own.
- Masks do not depend on how the data is split across processes: `mask_batch` gives each row
  its own generator, seeded from (seed, epoch, index of the sequence in the dataset) only, so
  1 process and 8 processes mask a given sequence identically, and evaluation (always the
  same epoch) sees the same masks every time it runs.

Pure functions of their arguments: nothing here knows about processes or torch.distributed.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from .tokenizer import special_ids, tokenizer_family

IGNORE_INDEX = -100  # label of positions that are not predicted; F.cross_entropy skips them


def special_token_ids(tokenizer) -> list[int]:
    """Ids of [PAD], [CLS], [SEP] and [MASK] (RoBERTa: <pad>, <s>, </s>, <mask>) in a
    `tokenizers.Tokenizer`: never chosen as targets, never drawn as random replacements.
    [UNK] is left out on purpose (see above). One definition: tokenizer.SpecialIds."""
    return special_ids(tokenizer).never_targets()


def word_starts(tokenizer, input_ids: Tensor) -> Tensor:
    """True at the first piece of every word of `input_ids` (any shape), False at the pieces
    that continue a word.

    WordPiece marks a piece that continues the word before it with "##" ("playing" ->
    "play", "##ing"); byte-level BPE (RoBERTa) marks a piece that starts a word after a space
    with "Ġ" ("Ġplaying" or "Ġplay", "ing"). Each special token ([CLS], [SEP], [PAD], [MASK],
    [UNK] and RoBERTa's <s>, </s>, <pad>, <mask>, <unk>) is a word of its own, and a piece
    right after one starts a word: a block that starts in the middle of a word (the piece it
    continued is not there), the first word of a sentence after [CLS] or <s>, which in BPE
    has no "Ġ", and the word after a <mask>, which took the space before it. (The corpus
    joins its lines with nothing between them, minibert/data.py: in BPE a line's first word,
    without "Ġ", is then counted as the end of the previous line's last word.)
    """
    is_continuation, is_special = _piece_tables(tokenizer)
    ids = input_ids.long()
    starts = ~is_continuation[ids] | is_special[ids]
    after_special = torch.zeros_like(starts)
    after_special[..., 1:] = is_special[ids[..., :-1]]
    starts |= after_special
    starts[..., :1] = True  # a sequence always starts a word
    return starts


@functools.lru_cache(maxsize=8)
def _piece_tables(tokenizer) -> tuple[Tensor, Tensor]:
    """Two (vocab_size,) bool tables of a tokenizer: pieces that continue a word, special
    tokens."""
    family = tokenizer_family(tokenizer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    is_continuation = torch.zeros(size, dtype=torch.bool)
    is_special = torch.zeros(size, dtype=torch.bool)
    for token, index in vocab.items():
        is_continuation[index] = not family.starts_word(token)
        is_special[index] = token in family.special_tokens
    return is_continuation, is_special


def make_masker(tokenizer, *, vocab_size: int, mlm_probability: float = 0.15,
                whole_word_mask: bool = False) -> Callable:
    """`mask_batch` with a tokenizer's special ids filled in: what the trainer and the
    evaluation call as mask(input_ids, sequence_indices, seed=..., epoch=...). With
    whole_word_mask, each call also passes the batch's `word_starts`."""
    mask = functools.partial(mask_batch, mask_token_id=special_ids(tokenizer).mask,
                             special_token_ids=special_token_ids(tokenizer),
                             vocab_size=vocab_size, mlm_probability=mlm_probability)
    if not whole_word_mask:
        return mask

    def mask_whole_words(input_ids: Tensor, sequence_indices: Iterable[int], **kwargs):
        return mask(input_ids, sequence_indices, word_starts=word_starts(tokenizer, input_ids),
                    **kwargs)
    return mask_whole_words


def mask_tokens(input_ids: Tensor, *, mask_token_id: int, special_token_ids: Iterable[int],
                vocab_size: int, mlm_probability: float = 0.15, mask_ratio: float = 0.8,
                random_ratio: float = 0.1, generator: torch.Generator | None = None,
                word_starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mask a (batch, seq) or (seq,) tensor of token ids; returns new (inputs, labels) tensors
    of the same shape (int64). `input_ids` is not modified. All randomness comes from
    `generator` (torch's global generator when None). With `word_starts` (a bool tensor of
    the same shape, minibert.masking.word_starts), targets are whole words."""
    special, replacements = _check(input_ids, mask_token_id, special_token_ids, vocab_size,
                                   mlm_probability, mask_ratio, random_ratio, word_starts)
    rows = input_ids.long().reshape(-1, input_ids.shape[-1])  # (batch, seq)
    starts = None if word_starts is None else word_starts.reshape(rows.shape)
    draws = _draw(rows.shape, len(replacements), generator)
    inputs, labels = _apply(rows, *draws, special=special, replacements=replacements,
                            mask_token_id=mask_token_id, mlm_probability=mlm_probability,
                            mask_ratio=mask_ratio, random_ratio=random_ratio, word_starts=starts)
    return inputs.reshape(input_ids.shape), labels.reshape(input_ids.shape)


def mask_batch(input_ids: Tensor, sequence_indices: Iterable[int], *, seed: int, epoch: int,
               mask_token_id: int, special_token_ids: Iterable[int], vocab_size: int,
               mlm_probability: float = 0.15, mask_ratio: float = 0.8,
               random_ratio: float = 0.1,
               word_starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mask a (batch, seq) batch whose row i is sequence `sequence_indices[i]` of the dataset.

    Row i is masked exactly as `mask_tokens(input_ids[i], generator=row_generator(seed, epoch,
    sequence_indices[i]))` would mask it: the result depends on (seed, epoch, index) and the
    row's tokens only, never on the other rows of the batch or on the number of processes.
    `word_starts` ((batch, seq) bool, from the row's tokens) asks for whole-word targets.
    """
    special, replacements = _check(input_ids, mask_token_id, special_token_ids, vocab_size,
                                   mlm_probability, mask_ratio, random_ratio, word_starts)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    indices = [int(i) for i in sequence_indices]
    if len(indices) != input_ids.shape[0]:
        raise ValueError(f"{len(indices)} sequence indices for a batch of {input_ids.shape[0]}")
    row_draws = [_draw(input_ids.shape[1:], len(replacements), row_generator(seed, epoch, i))
                 for i in indices]
    scores, action, replacement = (torch.stack(d) for d in zip(*row_draws))  # (batch, seq)
    return _apply(input_ids.long(), scores, action, replacement, special=special,
                  replacements=replacements, mask_token_id=mask_token_id,
                  mlm_probability=mlm_probability, mask_ratio=mask_ratio,
                  random_ratio=random_ratio, word_starts=word_starts)


def row_generator(seed: int, epoch: int, sequence_index: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch, sequence_index) alone. numpy's SeedSequence
    hashes the three numbers, so nearby triples give unrelated streams."""
    if min(seed, epoch, sequence_index) < 0:
        raise ValueError(f"seed, epoch and sequence index must be >= 0, got "
                         f"{(seed, epoch, sequence_index)}")
    state = np.random.SeedSequence([seed, epoch, sequence_index]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _check(input_ids, mask_token_id, special_token_ids, vocab_size, mlm_probability,
           mask_ratio, random_ratio, word_starts=None) -> tuple[Tensor, Tensor]:
    """Validate the arguments; return the special ids and the ids a random replacement may
    take, both as int64 tensors."""
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be (batch, seq) or (seq,), got {tuple(input_ids.shape)}")
    if word_starts is not None and (word_starts.dtype != torch.bool
                                    or word_starts.shape != input_ids.shape):
        raise ValueError(f"word_starts must be a bool tensor of input_ids' shape "
                         f"{tuple(input_ids.shape)}, got {word_starts.dtype} "
                         f"{tuple(word_starts.shape)}")
    if not 0.0 < mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability}")
    if mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1.0:
        raise ValueError(f"mask_ratio {mask_ratio} and random_ratio {random_ratio} must be "
                         f">= 0 and sum to at most 1")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary")
    special = torch.tensor(sorted(set(int(i) for i in special_token_ids)), dtype=torch.long)
    is_replacement = torch.ones(vocab_size, dtype=torch.bool)
    is_replacement[special[(special >= 0) & (special < vocab_size)]] = False
    replacements = is_replacement.nonzero().squeeze(1)  # (vocab_size - num_special,)
    if len(replacements) == 0:
        raise ValueError("every id of the vocabulary is special: no random replacement exists")
    return special, replacements


def _draw(shape, num_replacements: int, generator: torch.Generator | None):
    """All the randomness of masking, as three tensors of `shape`: a score per position (the
    lowest scores become targets), a uniform number that picks mask / random / keep, and the
    index of a random replacement. Drawn on the generator's device (CPU without one)."""
    device = generator.device if generator is not None else torch.device("cpu")
    scores = torch.rand(shape, generator=generator, device=device)
    action = torch.rand(shape, generator=generator, device=device)
    replacement = torch.randint(num_replacements, shape, generator=generator, device=device)
    return scores, action, replacement


def _apply(input_ids: Tensor, scores: Tensor, action: Tensor, replacement: Tensor, *,
           special: Tensor, replacements: Tensor, mask_token_id: int, mlm_probability: float,
           mask_ratio: float, random_ratio: float,
           word_starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Turn the draws of `_draw` into (inputs, labels) for a (batch, seq) batch."""
    device = input_ids.device
    scores, action = scores.to(device), action.to(device)
    replacement = replacements.to(device)[replacement.to(device)]  # (batch, seq) token ids
    is_special = torch.isin(input_ids, special.to(device))  # (batch, seq)

    # Targets: the k lowest-scoring maskable positions of each row, k = max(1, round(p * n)).
    num_maskable = (~is_special).sum(dim=1)  # (batch,)
    num_targets = torch.round(num_maskable * mlm_probability).long().clamp(min=1)
    num_targets = torch.minimum(num_targets, num_maskable)  # 0 only for an all-special row
    scores = scores.masked_fill(is_special, 2.0)  # above every uniform draw: never chosen
    if word_starts is None:
        rank = scores.argsort(dim=1, stable=True).argsort(dim=1)  # each score's rank in its row
        chosen = rank < num_targets[:, None]  # (batch, seq)
    else:
        chosen = _whole_word_targets(scores, is_special, word_starts.to(device), num_targets)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)

    # Why 80/10/10 (section 3.1, appendix C.2): [MASK] never appears when the model is
    # fine-tuned, so masking every target would pre-train on inputs unlike the ones it will
    # see. A random token in 10% of targets means no input token can be trusted to be the
    # right word, so the model keeps a contextual representation of every token; leaving 10%
    # unchanged biases that representation toward the word actually observed.
    to_mask = chosen & (action < mask_ratio)
    to_random = chosen & (action >= mask_ratio) & (action < mask_ratio + random_ratio)
    inputs = input_ids.masked_fill(to_mask, mask_token_id)
    inputs = torch.where(to_random, replacement, inputs)
    return inputs, labels


def _whole_word_targets(scores: Tensor, is_special: Tensor, word_starts: Tensor,
                        num_targets: Tensor) -> Tensor:
    """Whole-word targets of a (batch, seq) batch: every piece of a word, or none of it.

    Words are visited in the order of the score drawn at their first piece. A word is taken
    while it fits the row's budget num_targets (= round(p * maskable pieces)); one that would
    overshoot it is skipped, so a shorter word further on can fill the budget exactly, as
    Google's create_pretraining_data.py does. If no word fits (a budget of 1, and every word
    two pieces or more) the first word is taken anyway: every row keeps a target.
    """
    starts = word_starts.clone()
    starts[:, 0] = True  # a row always starts a word
    word = starts.long().cumsum(dim=1) - 1  # (batch, seq) index of each piece's word in its row
    # Words are numbered 0..num_words-1 < seq, so (batch, seq) tables hold one entry per word.
    # Special tokens are words of their own (word_starts) and count 0 maskable pieces.
    lengths = torch.zeros_like(word).scatter_add_(1, word, (~is_special).long())
    first_scores = torch.where(starts, scores, torch.inf)
    word_scores = torch.full_like(scores, torch.inf).scatter_reduce_(1, word, first_scores,
                                                                     "amin")
    order = word_scores.argsort(dim=1, stable=True)  # (batch, seq) words, lowest score first
    sorted_lengths = lengths.gather(1, order).tolist()
    taken = np.zeros(tuple(word.shape), dtype=bool)  # taken[row, i]: the i-th word in order
    for row, (row_lengths, budget) in enumerate(zip(sorted_lengths, num_targets.tolist())):
        total = 0
        for i, length in enumerate(row_lengths):
            if total == budget:
                break
            if 0 < length <= budget - total:
                taken[row, i] = True
                total += length
        if total == 0 and budget > 0:  # nothing fitted: the first maskable word in order
            taken[row, next(i for i, length in enumerate(row_lengths) if length > 0)] = True
    taken_words = torch.zeros_like(starts).scatter_(1, order, torch.from_numpy(taken).to(
        starts.device))  # (batch, seq) by word index
    return taken_words.gather(1, word) & ~is_special
