"""Fill-mask: what a masked language model guesses for each [MASK] in a sentence.

    python -m minibert.fill_mask --model ../shared/assets/checkpoints/bert-tiny-splade-mlm \\
        "Learning a new language can be [MASK] but rewarding."
    python -m minibert.fill_mask --model out/bert-tiny --examples         # the six demo sentences
    python -m minibert.fill_mask --model out/bert-tiny --file sentences.txt --json --top-k 10
    minibert-fill-mask --model out/bert-tiny --order confidence "[MASK] [MASK] [MASK]!"

--model takes a minibert checkpoint folder or a HuggingFace one (converted on the fly).
A sentence with one mask gets the top-k tokens for it, each with its probability (softmax
over the vocabulary) and the completed sentence. A sentence with several masks is filled one
mask at a time, running the model again after each, because BERT predicts every mask
independently of the others: filling them all from one pass can give "the the the". Every mask
but the last takes its most probable token; the last one gets the top-k list. The order is
left to right, or with --order confidence the most confident remaining mask first.

All sentences go through the model together: one padded forward pass per filling step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .checkpoint import read_checkpoint
from .errors import MinibertError, run_main
from .model import BertForMaskedLM
from .tokenizer import load_tokenizer

ORDERS = ("left-to-right", "confidence")
MASK_TOKEN = "[MASK]"
# Users type [mask] as often as [MASK]; the tokenizer matches the special token case-sensitively.
_ANY_CASE_MASK = re.compile(re.escape(MASK_TOKEN), re.IGNORECASE)

# The seed's demo: one mask, six masks in a row, and a few sentences with one to three masks.
EXAMPLE_SENTENCES = (
    "Learning a new language can be [MASK] but rewarding.",
    "[MASK] [MASK] [MASK] [MASK] [MASK] [MASK]!",
    "The capital of France is [MASK].",
    "The man worked as a [MASK].",
    "Paris is the [MASK] [MASK] of France.",
    "I [MASK] to the store yesterday to buy some [MASK].",
)


@dataclass
class _Sentence:
    """One input on its way through fill_masks: its token ids with the masks filled so far."""

    text: str  # the sentence as the user wrote it
    ids: list[int]  # [CLS] ... [SEP]; filled masks hold their chosen token
    masks: list[int]  # positions of the masks still to fill, left to right
    filled: list[dict] = field(default_factory=list)  # {"position", "token", "score"}, fill order
    predictions: list[dict] = field(default_factory=list)  # top-k for the last mask filled

    def to_dict(self) -> dict:
        return {"input": self.text, "predictions": self.predictions, "filled": self.filled}


def encode(tokenizer: Tokenizer, text: str, max_positions: int) -> list[int]:
    """[CLS] text [SEP] as token ids, with [mask] in any case read as the mask token."""
    ids = tokenizer.encode(_ANY_CASE_MASK.sub(MASK_TOKEN, text)).ids
    if tokenizer.token_to_id(MASK_TOKEN) not in ids:
        raise MinibertError(f"no {MASK_TOKEN} in {text!r}")
    if len(ids) > max_positions:
        raise MinibertError(f"{len(ids)} tokens in {text[:30] + '...'!r}, but the model has "
                            f"only {max_positions} positions")
    return ids


@torch.inference_mode()
def mask_probabilities(model: BertForMaskedLM, batch_ids: list[list[int]],
                       positions: list[list[int]], pad_token_id: int) -> list[torch.Tensor]:
    """One forward pass over all sentences (padded); for sentence i, the probability of every
    vocabulary token at each of positions[i]: a (len(positions[i]), vocab) tensor."""
    device = model.word_embeddings.device
    input_ids = torch.full((len(batch_ids), max(map(len, batch_ids))), pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    hidden = model.bert(input_ids.to(device), attention_mask.to(device))  # (batch, seq, hidden)
    rows = [row for row, cols in enumerate(positions) for _ in cols]
    cols = [col for cols in positions for col in cols]
    # The head only where a mask is: the vocabulary projection is a small model's largest
    # matrix multiply, and the logits at the other positions would be thrown away.
    logits = model.mlm_head(hidden[rows, cols], model.word_embeddings)  # (num_masks, vocab)
    probs = logits.float().softmax(dim=-1).cpu()
    return list(probs.split([len(cols) for cols in positions]))


def _fill_one(sentence: _Sentence, probs: torch.Tensor, tokenizer: Tokenizer, top_k: int,
              order: str) -> None:
    """Fill one of the sentence's masks; probs has one row per remaining mask, left to right."""
    if len(sentence.masks) == 1:
        # The last mask: the top-k candidates, each with the sentence it completes.
        position = sentence.masks.pop()
        scores, token_ids = probs[0].topk(top_k)
        for score, token_id in zip(scores.tolist(), token_ids.tolist()):
            ids = sentence.ids[:position] + [token_id] + sentence.ids[position + 1:]
            sentence.predictions.append({
                "token": tokenizer.id_to_token(token_id), "token_id": token_id, "score": score,
                "sequence": tokenizer.decode(ids, skip_special_tokens=True)})
        best = sentence.predictions[0]
        sentence.filled.append({"position": position, "token": best["token"],
                                "score": best["score"]})
        return
    scores, token_ids = probs.max(dim=-1)  # (remaining,): each mask's most probable token
    pick = 0 if order == "left-to-right" else int(scores.argmax())
    position = sentence.masks.pop(pick)
    token_id = int(token_ids[pick])
    sentence.ids[position] = token_id
    sentence.filled.append({"position": position, "token": tokenizer.id_to_token(token_id),
                            "score": float(scores[pick])})


def fill_masks(model: BertForMaskedLM, tokenizer: Tokenizer, texts: list[str] | tuple[str, ...],
               top_k: int = 5, order: str = "left-to-right") -> list[dict]:
    """fill_mask for many sentences at once: each filling step is one padded forward pass."""
    vocab_size = model.config.vocab_size
    if not 1 <= top_k <= vocab_size:
        raise MinibertError(f"top_k must be between 1 and the vocabulary size ({vocab_size}), "
                            f"got {top_k}")
    if order not in ORDERS:
        raise MinibertError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    sentences = []
    for text in texts:
        ids = encode(tokenizer, text, model.config.max_position_embeddings)
        sentences.append(_Sentence(text, ids, [i for i, t in enumerate(ids) if t == mask_id]))
    pending = sentences
    while pending:
        probs = mask_probabilities(model, [s.ids for s in pending], [s.masks for s in pending],
                                   tokenizer.token_to_id("[PAD]"))
        for sentence, sentence_probs in zip(pending, probs):
            _fill_one(sentence, sentence_probs, tokenizer, top_k, order)
        pending = [s for s in pending if s.masks]
    return [s.to_dict() for s in sentences]


def fill_mask(model: BertForMaskedLM, tokenizer: Tokenizer, text: str, top_k: int = 5,
              order: str = "left-to-right") -> dict:
    """The model's guesses for the [MASK]s in `text` (model in eval mode, as loaded).

    Returns {"input": text,
             "predictions": [{"token", "token_id", "score", "sequence"}, ...],  # top_k, best first
             "filled": [{"position", "token", "score"}, ...]}                   # one per mask
    "predictions" are the candidates for the last mask filled, "sequence" the whole sentence
    with them in place, decoded as BERT's tokenizer decodes (lower-case, word pieces joined).
    "filled" lists every mask in the order filled: its position in the token ids ([CLS] is 0)
    and the token it took with that token's probability at the time.
    """
    return fill_masks(model, tokenizer, [text], top_k, order)[0]


def format_result(result: dict) -> str:
    """The seed's plain-text form of one fill_mask result."""
    lines = [f"Input sentence: {result['input']}", f"Top {len(result['predictions'])} predictions:"]
    lines += [f"  Token: '{p['token']}' | Score: {p['score']:.4f} | Sequence: '{p['sequence']}'"
              for p in result["predictions"]]
    return "\n".join(lines)


@dataclass
class FillMaskArgs:
    model: str  # checkpoint folder (minibert or HuggingFace) or hub id
    texts: list[str]  # sentences to fill, each with at least one [MASK]
    top_k: int = 5  # candidates to list for the last mask of each sentence
    order: str = "left-to-right"  # which mask of several to fill first: one of ORDERS
    json: bool = False  # one JSON object per sentence instead of the plain listing

    def __post_init__(self) -> None:
        if not self.texts:
            raise MinibertError("no sentence to fill: pass TEXT, --file F or --examples")


def _read_sentences(file: Path) -> list[str]:
    """One sentence a line; blank lines are skipped."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise MinibertError(f"{file}: cannot read sentences ({error})") from None
    return [line.strip() for line in lines if line.strip()]


def parse_args(argv: list[str] | None = None) -> FillMaskArgs:
    parser = argparse.ArgumentParser(prog="python -m minibert.fill_mask",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="*", help="sentences with [MASK] (or [mask]) in them")
    parser.add_argument("--model", required=True,
                        help="minibert or HuggingFace checkpoint folder, or a hub id")
    parser.add_argument("--file", type=Path, help="read sentences from this file, one a line")
    parser.add_argument("--examples", action="store_true",
                        help="fill the six demo sentences (EXAMPLE_SENTENCES)")
    parser.add_argument("--top-k", type=int, default=5, help="candidates to list (default 5)")
    parser.add_argument("--order", choices=ORDERS, default="left-to-right",
                        help="which of several masks to fill first (default left-to-right)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sentence")
    ns = parser.parse_args(argv)
    texts = list(ns.text)
    if ns.file is not None:
        texts += _read_sentences(ns.file)
    if ns.examples:
        texts += EXAMPLE_SENTENCES
    return FillMaskArgs(model=ns.model, texts=texts, top_k=ns.top_k, order=ns.order, json=ns.json)


def run(args: FillMaskArgs) -> None:
    model, folder, notices = read_checkpoint(args.model, require_head=True)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    results = fill_masks(model, load_tokenizer(folder), args.texts, args.top_k, args.order)
    if args.json:
        print("\n".join(json.dumps(result) for result in results))
    else:
        print("\n\n".join(format_result(result) for result in results))


def main() -> None:
    """Entry point of `python -m minibert.fill_mask` and the minibert-fill-mask command."""
    run_main(lambda: run(parse_args()))


if __name__ == "__main__":
    main()
