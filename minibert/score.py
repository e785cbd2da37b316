"""Pseudo-log-likelihood: how probable a masked LM finds a sentence (Salazar et al. 2020).

    python -m minibert.score --model ../shared/assets/checkpoints/bert-tiny-splade-mlm \\
        "The keys to the cabinet are on the table." "The keys to the cabinet is on the table."
    python -m minibert.score --model runs/quickstart/final --file sentences.txt --json
    minibert-score --model out/bert-tiny --word-l2r "The ichthyologist studied the fish."

A masked LM defines no probability of a sentence: it predicts hidden tokens from both sides.
Salazar et al. 2020 ("Masked Language Model Scoring", ACL) score a sentence by hiding each
token in turn and summing log P(token | every other token): the pseudo-log-likelihood, PLL.
It is a sum of log-probabilities, so it is <= 0 and higher is better; pseudo-perplexity
exp(-PLL / tokens) is its per-token form. [CLS] and [SEP] are context, never scored. Ranking
candidates by PLL (the plain output lists the best first) picks the more acceptable of two
sentences, or rescores the n-best list of a speech recognizer or translator. PLL is a sum, so
longer sentences score lower: compare sentences of similar length, or pseudo-perplexities.

--word-l2r is the variant of Kauf & Ivanova 2023 ("A Better Way to Do Masked Language Model
Scoring", ACL). A word split into pieces ("ichthyologist" -> "ich", "##thy", "##ologist")
is easy to restore piece by piece when the other pieces stay visible, so plain PLL inflates
the scores of rare, long words. word-l2r also hides the pieces of the same word to
the right of the one being scored: each piece is predicted from the context and the pieces of
its word to its left only. A word's last piece, and a one-piece word, score as in plain PLL.
The first column of the listing is then headed PLL-word-l2r, and --json's "metric" says which
score "pll" holds (PLL or PLL-word-l2r).

A sentence that cannot be scored (no tokens, longer than the model's positions) is reported
on stderr as FILE:LINE (or argument N) and in --json as {"text", "error": {"source",
"message"}}; the others are still scored, and the exit status is 1.

A sentence of n tokens becomes n masked copies. The copies of all sentences go through the
model batch_size at a time (padded where sentences differ in length), so memory stays bounded
for any number and length of sentences.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer

from .checkpoint import read_checkpoint
from .cli import ArgumentParser, read_sentences, report_failures
from .errors import MinibertError, run_main
from .masking import word_starts
from .model import BertForMaskedLM
from .precision import check_device, resolve_device
from .tokenizer import load_tokenizer, special_ids

DEFAULT_BATCH_SIZE = 32  # masked copies per forward pass


def encode(tokenizer: Tokenizer, text: str, max_positions: int) -> torch.Tensor:
    """[CLS] text [SEP] as a (seq,) tensor of token ids."""
    ids = torch.tensor(tokenizer.encode(text).ids)
    # Text that spells a special token ("[SEP]", "[MASK]") is read as [UNK], as in the corpus
    # (minibert.data): a [SEP] inside the sentence would cut it in two.
    special = special_ids(tokenizer)
    ids[1:-1][torch.isin(ids[1:-1], torch.tensor(special.not_from_text()))] = special.unk
    if len(ids) <= 2:
        raise MinibertError(f"nothing to score in {text!r}: it has no tokens")
    if len(ids) > max_positions:
        raise MinibertError(f"{len(ids)} tokens in {text[:30] + '...'!r}, but the model has "
                            f"only {max_positions} positions")
    return ids


def masked_copies(ids: torch.Tensor, starts: torch.Tensor, mask_token_id: int,
                  word_l2r: bool) -> torch.Tensor:
    """(n, seq) copies of a (seq,) [CLS] ... [SEP] sequence with n = seq - 2 tokens: copy i
    has token i + 1 hidden, and with word_l2r also the later pieces of the same word.
    `starts` (seq,) is True at the first piece of every word (masking.word_starts)."""
    seq = len(ids)
    positions = torch.arange(1, seq - 1)  # (n,) the scored position of each copy
    columns = torch.arange(seq)
    hide = columns[None, :] == positions[:, None]  # (n, seq)
    if word_l2r:
        word = starts.long().cumsum(0)  # (seq,) index of the word each piece belongs to
        same_word = word[None, :] == word[positions][:, None]  # (n, seq)
        hide |= same_word & (columns[None, :] > positions[:, None])
    return ids.repeat(len(positions), 1).masked_fill(hide, mask_token_id)


def _copies(sentences: list[torch.Tensor | None], tokenizer: Tokenizer, mask_token_id: int,
            word_l2r: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(sentence index, scored position, masked copy) for every token of every sentence (None:
    a sentence that could not be encoded), built one sentence at a time so that only one
    sentence's copies are ever held."""
    for index, ids in enumerate(sentences):
        if ids is None:
            continue
        copies = masked_copies(ids, word_starts(tokenizer, ids), mask_token_id, word_l2r)
        for position, copy in enumerate(copies, start=1):
            yield index, position, copy


def _chunk_logprobs(model: BertForMaskedLM, chunk: list[tuple[int, int, torch.Tensor]],
                    sentences: list[torch.Tensor | None], pad_token_id: int) -> list[float]:
    """One forward pass over a chunk of masked copies (padded to the longest): for each copy,
    log P(original token) at its hidden position."""
    copies = [copy for _, _, copy in chunk]
    positions = [[position] for _, position, _ in chunk]  # one hidden position per copy
    logits = model.logits_at(copies, positions, pad_token_id)  # (chunk, vocab)
    rows = torch.arange(len(chunk), device=logits.device)
    targets = torch.stack([sentences[index][position] for index, position, _ in chunk])
    return logits.float().log_softmax(dim=-1)[rows, targets.to(logits.device)].tolist()


@torch.inference_mode()
def score_sentences(model: BertForMaskedLM, tokenizer: Tokenizer,
                    texts: list[str] | tuple[str, ...], *, word_l2r: bool = False,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict]:
    """`pseudo_log_likelihood` of many sentences; the same order as `texts`.

    A text that cannot be scored (no tokens, longer than the model's positions) gets
    {"text": text, "error": {"message": why}} and does not stop the others."""
    if batch_size < 1:
        raise MinibertError(f"batch_size must be >= 1, got {batch_size}")
    sentences: list[torch.Tensor | None] = []
    errors: dict[int, str] = {}
    for index, text in enumerate(texts):
        try:
            sentences.append(encode(tokenizer, text, model.config.max_sequence_length))
        except MinibertError as error:
            sentences.append(None)
            errors[index] = str(error)
    logprobs = [[0.0] * (len(ids) - 2) if ids is not None else [] for ids in sentences]
    pad_token_id, mask_token_id = special_ids(tokenizer).pad, special_ids(tokenizer).mask
    was_training = model.training
    model.eval()  # dropout off: a score must not depend on the mode the caller left it in
    try:
        copies = _copies(sentences, tokenizer, mask_token_id, word_l2r)
        while chunk := list(itertools.islice(copies, batch_size)):
            values = _chunk_logprobs(model, chunk, sentences, pad_token_id)
            for (index, position, _), value in zip(chunk, values):
                logprobs[index][position - 1] = value
    finally:
        model.train(was_training)
    results = []
    for index, (text, ids, values) in enumerate(zip(texts, sentences, logprobs)):
        if ids is None:
            results.append({"text": text, "error": {"message": errors[index]}})
            continue
        tokens = [{"token": tokenizer.id_to_token(token_id), "token_id": token_id, "logprob": value}
                  for token_id, value in zip(ids[1:-1].tolist(), values)]
        pll = sum(values)
        results.append({"text": text, "pll": pll,
                        "pseudo_perplexity": math.exp(-pll / len(tokens)), "tokens": tokens})
    return results


def pseudo_log_likelihood(model: BertForMaskedLM, tokenizer: Tokenizer, text: str, *,
                          word_l2r: bool = False, batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """The pseudo-log-likelihood of `text` under a masked LM (Salazar et al. 2020).

    Returns {"text": text, "pll": sum of the token log-probabilities,
             "pseudo_perplexity": exp(-pll / number of tokens),
             "tokens": [{"token", "token_id", "logprob"}, ...]}   # without [CLS] and [SEP]
    logprob is the natural log of P(token | the sentence with it hidden), and with word_l2r
    also with the later pieces of its word hidden (Kauf & Ivanova 2023). The model is run in
    eval mode whatever its mode, which is restored afterwards. Raises MinibertError for a text
    it cannot score.
    """
    result = score_sentences(model, tokenizer, [text], word_l2r=word_l2r,
                             batch_size=batch_size)[0]
    if "error" in result:
        raise MinibertError(result["error"]["message"])
    return result


def score_name(word_l2r: bool) -> str:
    """What the "pll" of a result is: PLL, or PLL-word-l2r when word_l2r hid the later pieces."""
    return "PLL-word-l2r" if word_l2r else "PLL"


def format_results(results: list[dict], word_l2r: bool = False) -> str:
    """The plain listing: one line per sentence, highest PLL (most probable) first; the first
    column is headed by the score's name (score_name)."""
    name = score_name(word_l2r)
    width = max(9, len(name))
    lines = [f"{name:>{width}}  {'pseudo-PPL':>10}  {'tokens':>6}  sentence"]
    for result in sorted(results, key=lambda r: r["pll"], reverse=True):
        lines.append(f"{result['pll']:{width}.2f}  {result['pseudo_perplexity']:10.2f}  "
                     f"{len(result['tokens']):6d}  {result['text']}")
    return "\n".join(lines)


@dataclass
class ScoreArgs:
    model: str  # checkpoint folder (minibert or HuggingFace) with a masked-LM head, or hub id
    texts: list[str]  # sentences to score
    word_l2r: bool = False  # also hide the later pieces of the scored word (Kauf & Ivanova 2023)
    batch_size: int = DEFAULT_BATCH_SIZE  # masked copies per forward pass: bounds memory
    device: str = "auto"  # auto|cpu|cuda; auto: cuda when a GPU is visible
    json: bool = False  # one JSON object per sentence, in input order, instead of the ranking
    sources: list[str] = field(default_factory=list)  # where each text came from: "FILE:LINE"

    def __post_init__(self) -> None:
        if not self.texts:
            raise MinibertError("no sentence to score: pass TEXT or --file F")
        if not self.sources:
            self.sources = [f"argument {i}" for i in range(1, len(self.texts) + 1)]
        if self.batch_size < 1:
            raise MinibertError(f"batch_size must be >= 1, got {self.batch_size}")
        check_device(self.device)


def parse_args(argv: list[str] | None = None) -> ScoreArgs:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("text", nargs="*", help="sentences to score")
    parser.add_argument("--model", required=True,
                        help="minibert or HuggingFace checkpoint folder with a masked-LM head, "
                             "or a hub id")
    parser.add_argument("--file", type=Path, help="read sentences from this file, one a line")
    parser.add_argument("--word-l2r", action="store_true",
                        help="also hide the later pieces of the word being scored "
                             "(Kauf & Ivanova 2023)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"masked copies per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu or cuda; auto: cuda when a GPU is visible")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per sentence, in input order: text, metric "
                             "(PLL or PLL-word-l2r), pll, pseudo_perplexity, tokens")
    ns = parser.parse_args(argv)
    sentences = [(f"argument {i}", text) for i, text in enumerate(ns.text, start=1)]
    if ns.file is not None:
        sentences += read_sentences(ns.file)
    return ScoreArgs(model=ns.model, texts=[text for _, text in sentences],
                     word_l2r=ns.word_l2r, batch_size=ns.batch_size, device=ns.device,
                     json=ns.json, sources=[source for source, _ in sentences])


def run(args: ScoreArgs) -> int:
    """Score every sentence; 1 when any could not be scored (each reported on stderr)."""
    device = resolve_device(args.device)
    model, folder, notices = read_checkpoint(args.model, require_head=True)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    model.to(device)
    results = score_sentences(model, load_tokenizer(folder), args.texts, word_l2r=args.word_l2r,
                              batch_size=args.batch_size)
    failed = report_failures(results, args.sources)
    if args.json:
        name = score_name(args.word_l2r)
        print("\n".join(json.dumps(result if "error" in result else
                                    {"text": result["text"], "metric": name, **result})
                         for result in results))
    else:
        good = [result for result in results if "error" not in result]
        if good:
            print(format_results(good, args.word_l2r))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m minibert.score` and the minibert-score command."""
    run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
