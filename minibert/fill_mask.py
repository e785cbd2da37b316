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
but the last takes its most probable token (greedy); the last one gets the top-k list. The
order is left to right, or with --order confidence the most confident remaining mask first.
The plain listing shows each earlier pick with its probability; in --json, "filled" lists
every pick in the order made, the last mask's best candidate included.

[CLS], [SEP] and [PAD] typed in a sentence are read as [UNK], as the training data pipeline
reads them (minibert/data.py): a sentence is one segment, framed by the model's own [CLS] and
[SEP]. The completed sentences show [UNK] where it is, rather than dropping it. A RoBERTa
model's tokens are <s>, </s>, <pad>, <unk> and <mask> (minibert/tokenizer.py): [MASK] typed
for it is read as <mask>, with a note, and <mask> typed for a BERT model as [MASK].

A sentence that cannot be filled (no mask, longer than the model's positions) is reported on
stderr as FILE:LINE (or argument N, example N) and in --json as an "error" object; the others
are still answered, and the exit status is 1. --truncate keeps, of a long sentence, the window
of word pieces around its masks that fits the model, instead of refusing it.

All sentences go through the model together: one padded forward pass per filling step.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .checkpoint import read_checkpoint
from .cli import ArgumentParser, read_sentences, report_failures
from .errors import MinibertError, run_main
from .model import BertForMaskedLM
from .tokenizer import load_tokenizer, special_ids, tokenizer_family

ORDERS = ("left-to-right", "confidence")
# Users type [mask] as often as [MASK], and BERT's spelling for a RoBERTa model (or the other
# way round); the tokenizer matches its own mask token only, and case-sensitively.
_ANY_MASK = re.compile(r"\[mask\]|<mask>", re.IGNORECASE)

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
    truncated: dict | None = None  # {"tokens", "kept"} when only a window of the text is used

    def to_dict(self) -> dict:
        result = {"input": self.text, "predictions": self.predictions, "filled": self.filled}
        if self.truncated is not None:
            result["truncated"] = self.truncated
        return result


def _window(ids: list[int], masks: list[int], max_positions: int) -> tuple[int, int]:
    """[start, end) of the word pieces (ids without [CLS] and [SEP]) to keep so that, framed,
    they fit max_positions: centred on the masks, as much text on each side as fits."""
    pieces, width = len(ids) - 2, max_positions - 2
    first, last = masks[0] - 1, masks[-1] - 1  # indices among the word pieces
    if last - first + 1 > width:
        raise MinibertError(f"its masks span {last - first + 1} tokens, more than the model's "
                            f"{max_positions} positions hold even with --truncate")
    start = (first + last + 1) // 2 - width // 2
    start = min(max(start, 0, last - width + 1), first, pieces - width)
    return start, start + width


def _encode(tokenizer: Tokenizer, text: str, max_positions: int,
            truncate: bool) -> tuple[list[int], dict | None]:
    """(token ids [CLS] text [SEP], None) or, truncated, (ids of a window, what was kept)."""
    mask_token = tokenizer_family(tokenizer).mask
    ids = tokenizer.encode(_ANY_MASK.sub(mask_token, text)).ids
    # A [CLS], [SEP] or [PAD] typed in the text is matched as that special token; read it as
    # [UNK], as the data pipeline does, so that the only frame is the model's own.
    special = special_ids(tokenizer)
    typed_specials = set(special.not_from_text(keep_mask=True))  # masks are wanted
    ids = ids[:1] + [special.unk if i in typed_specials else i for i in ids[1:-1]] + ids[-1:]
    masks = [i for i, t in enumerate(ids) if t == special.mask]
    if not masks:
        raise MinibertError(f"no {mask_token} in {text!r}")
    if len(ids) <= max_positions:
        return ids, None
    if not truncate:
        raise MinibertError(f"{len(ids)} tokens in {text[:30] + '...'!r}, but the model has "
                            f"only {max_positions} positions (--truncate keeps a window "
                            f"around the masks)")
    start, end = _window(ids, masks, max_positions)
    return ids[:1] + ids[1 + start:1 + end] + ids[-1:], {"tokens": len(ids), "kept": [start, end]}


def encode(tokenizer: Tokenizer, text: str, max_positions: int,
           truncate: bool = False) -> list[int]:
    """[CLS] text [SEP] as token ids, with [mask] or <mask> in any case read as the model's
    mask token and a typed [CLS], [SEP] or [PAD] (<s>, </s>, <pad>) as [UNK] (<unk>). Longer
    than max_positions: an error, or with truncate the window of the text around the masks
    that fits."""
    return _encode(tokenizer, text, max_positions, truncate)[0]


@torch.inference_mode()
def mask_probabilities(model: BertForMaskedLM, batch_ids: list[list[int]],
                       positions: list[list[int]], pad_token_id: int) -> list[torch.Tensor]:
    """One forward pass over all sentences (padded); for sentence i, the probability of every
    vocabulary token at each of positions[i]: a (len(positions[i]), vocab) tensor."""
    logits = model.logits_at(batch_ids, positions, pad_token_id)  # (num_masks, vocab)
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
                # Decoded between the frame, specials kept: a [UNK] shows rather than vanishes.
                "sequence": tokenizer.decode(ids[1:-1], skip_special_tokens=False)})
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
               top_k: int = 5, order: str = "left-to-right", truncate: bool = False,
               ) -> list[dict]:
    """fill_mask for many sentences at once: each filling step is one padded forward pass.

    One result per text, in order. A text that cannot be filled (no mask, too long) gets
    {"input": text, "error": {"message": why}} and does not stop the others. The model runs
    in eval mode (no dropout) whatever mode it is in, and is left in that mode afterwards.
    """
    vocab_size = model.config.vocab_size
    if not 1 <= top_k <= vocab_size:
        raise MinibertError(f"top_k must be between 1 and the vocabulary size ({vocab_size}), "
                            f"got {top_k}")
    if order not in ORDERS:
        raise MinibertError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    mask_id = special_ids(tokenizer).mask
    results: list[_Sentence | dict] = []
    for text in texts:
        try:
            ids, truncated = _encode(tokenizer, text, model.config.max_sequence_length,
                                     truncate)
        except MinibertError as error:
            results.append({"input": text, "error": {"message": str(error)}})
            continue
        results.append(_Sentence(text, ids, [i for i, t in enumerate(ids) if t == mask_id],
                                 truncated=truncated))
    was_training = model.training
    model.eval()  # dropout off: the answer must not depend on the caller's mode
    try:
        pending = [s for s in results if isinstance(s, _Sentence)]
        while pending:
            probs = mask_probabilities(model, [s.ids for s in pending],
                                       [s.masks for s in pending], special_ids(tokenizer).pad)
            for sentence, sentence_probs in zip(pending, probs):
                _fill_one(sentence, sentence_probs, tokenizer, top_k, order)
            pending = [s for s in pending if s.masks]
    finally:
        model.train(was_training)
    return [s.to_dict() if isinstance(s, _Sentence) else s for s in results]


def fill_mask(model: BertForMaskedLM, tokenizer: Tokenizer, text: str, top_k: int = 5,
              order: str = "left-to-right", truncate: bool = False) -> dict:
    """The model's guesses for the [MASK]s in `text` (in eval mode, whatever the model's mode).

    Returns {"input": text,
             "predictions": [{"token", "token_id", "score", "sequence"}, ...],  # top_k, best first
             "filled": [{"position", "token", "score"}, ...]}                   # one per mask
    "predictions" are the candidates for the last mask filled, "sequence" the whole sentence
    with them in place, decoded as BERT's tokenizer decodes (lower-case, word pieces joined;
    an [UNK] is kept). "filled" lists every mask in the order filled: its position in the token
    ids ([CLS] is 0) and the token it took with that token's probability at the time; all but
    the last took their most probable token. With truncate, a text longer than the model's
    positions is cut to the window around its masks, and the result adds
    "truncated": {"tokens": its length in tokens, "kept": [start, end) of its word pieces};
    positions then count in the window. Raises MinibertError for a text it cannot fill.
    """
    result = fill_masks(model, tokenizer, [text], top_k, order, truncate)[0]
    if "error" in result:
        raise MinibertError(result["error"]["message"])
    return result


def _top(k: int) -> str:
    """'Top 3 predictions', or 'Top prediction' for one."""
    return "Top prediction" if k == 1 else f"Top {k} predictions"


def format_result(result: dict) -> str:
    """The seed's plain-text form of one fill_mask result, with the earlier picks of a
    sentence with several masks listed before the last mask's candidates."""
    lines = [f"Input sentence: {result['input']}"]
    if "truncated" in result:
        start, end = result["truncated"]["kept"]
        lines.append(f"Truncated: kept word pieces {start}-{end} of "
                     f"{result['truncated']['tokens'] - 2}, around the masks")
    earlier = result["filled"][:-1]
    if earlier:
        lines.append("Filled first, each with its most probable token:")
        lines += [f"  Position {f['position']}: '{f['token']}' | Score: {f['score']:.4f}"
                  for f in earlier]
        lines.append(f"{_top(len(result['predictions']))} for the last mask "
                     f"(position {result['filled'][-1]['position']}):")
    else:
        lines.append(f"{_top(len(result['predictions']))}:")
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
    truncate: bool = False  # keep the window around the masks of a sentence that is too long
    sources: list[str] = field(default_factory=list)  # where each text came from: "FILE:LINE"

    def __post_init__(self) -> None:
        if not self.texts:
            raise MinibertError("no sentence to fill: pass TEXT, --file F or --examples")
        if not self.sources:
            self.sources = [f"sentence {i}" for i in range(1, len(self.texts) + 1)]


HELP = """\
how several masks are filled:
  one at a time, the model run again after each pick. Every mask but the last takes its most
  probable token (greedy), in the --order chosen: left to right, or the most confident
  remaining mask first. The last mask gets the --top-k candidates, each with the completed
  sentence. The plain listing shows the earlier picks with their probabilities; in --json,
  "filled" lists every pick in the order made (position in the token ids, [CLS] being 0).

a sentence that cannot be filled (no mask, too long) is reported on stderr as FILE:LINE
(argument N, example N), and in --json as {"input", "error": {"source", "message"}}; the
others are still answered, and the exit status is 1.
"""


def parse_args(argv: list[str] | None = None) -> FillMaskArgs:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=HELP)
    parser.add_argument("text", nargs="*",
                        help="sentences with [MASK] (or [mask]; RoBERTa: <mask>) in them")
    parser.add_argument("--model", required=True,
                        help="minibert or HuggingFace checkpoint folder, or a hub id")
    parser.add_argument("--file", type=Path, help="read sentences from this file, one a line")
    parser.add_argument("--examples", action="store_true",
                        help="fill the six demo sentences (EXAMPLE_SENTENCES)")
    parser.add_argument("--top-k", type=int, default=5,
                        help="candidates to list for the last mask (default 5)")
    parser.add_argument("--order", choices=ORDERS, default="left-to-right",
                        help="which of several masks to fill first (default left-to-right)")
    parser.add_argument("--truncate", action="store_true",
                        help="of a sentence longer than the model's positions, keep the window "
                             "of word pieces around its masks that fits (default: refuse it)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sentence")
    ns = parser.parse_args(argv)
    sentences = [(f"argument {i}", text) for i, text in enumerate(ns.text, start=1)]
    if ns.file is not None:
        sentences += read_sentences(ns.file)
    if ns.examples:
        sentences += [(f"example {i}", text) for i, text in enumerate(EXAMPLE_SENTENCES, start=1)]
    return FillMaskArgs(model=ns.model, texts=[text for _, text in sentences], top_k=ns.top_k,
                        order=ns.order, json=ns.json, truncate=ns.truncate,
                        sources=[source for source, _ in sentences])


def run(args: FillMaskArgs) -> int:
    """Answer every sentence; 1 when any could not be filled (each reported on stderr)."""
    model, folder, notices = read_checkpoint(args.model, require_head=True)
    tokenizer = load_tokenizer(folder)
    mask_token = tokenizer_family(tokenizer).mask
    if any(m.group(0).lower() != mask_token.lower()
           for text in args.texts for m in _ANY_MASK.finditer(text)):
        other = "[MASK]" if mask_token == "<mask>" else "<mask>"
        notices.append(f"{other} is read as {mask_token}, the mask token of this model")
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    results = fill_masks(model, tokenizer, args.texts, args.top_k, args.order, args.truncate)
    failed = report_failures(results, args.sources)
    if args.json:
        print("\n".join(json.dumps(result) for result in results))
    else:
        good = [format_result(result) for result in results if "error" not in result]
        if good:
            print("\n\n".join(good))
    return 1 if failed else 0


def main() -> None:
    """Entry point of `python -m minibert.fill_mask` and the minibert-fill-mask command."""
    run_main(lambda: run(parse_args()))


if __name__ == "__main__":
    main()
