"""Draw docs/images/attention_map.png, what each head of one layer looks at for one sentence,
and docs/images/attention_masks.png, the masks attention can apply.

    python docs/examples/attention_map.py                           # layer 0, the default sentence
    python docs/examples/attention_map.py --layer 1 --text "Your own sentence." --out map.png
    python docs/examples/attention_map.py --assets PATH --out map.png --masks-out masks.png

It writes docs/images/attention_map.png and, beside it, attention_masks.png (with --out
PATH, beside PATH).

The model calls F.scaled_dot_product_attention, which never hands the weights back. This
script recomputes them as minibert.model.attention_reference does, softmax(Q K^T / sqrt(d)),
from the layer's own fused qkv projection, and checks that multiplying them into V and
through the output projection gives exactly what BertSelfAttention.forward returns. Each
head's panel has its own colour scale (a head that spreads its weight thinly would be a flat
dark field on a common 0-1 scale), and each row's largest weight is circled.

The masks: chapter 1's padded batch through the model's own _key_padding_mask (black: a key
that no query may read), beside the full mask of BERT's bidirectional attention and the causal
mask of a left-to-right model such as GPT, which BERT does not have.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from minibert import load_pretrained, load_tokenizer  # noqa: E402
from minibert.model import _key_padding_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "The cat sat on the mat because it was warm."
BATCH = ("Tokenization splits unfamiliar words into pieces.", "The cat slept.")  # chapter 1.2


def attention_weights(model, input_ids: torch.Tensor, layer_index: int) -> torch.Tensor:
    """(heads, seq, seq) attention weights of one layer for one unpadded sentence."""
    with torch.no_grad():
        x = model.bert.embeddings(input_ids, None)
        for layer in model.bert.layers[:layer_index]:
            x = layer(x, None)
        attn = model.bert.layers[layer_index].attention
        batch, seq, hidden = x.shape
        qkv = attn.qkv(x).view(batch, seq, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (batch, heads, seq, head_dim)
        weights = ((q / math.sqrt(attn.head_dim)) @ k.transpose(-2, -1)).softmax(dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(batch, seq, hidden)
        matches = torch.allclose(attn.out(context), attn(x, None), atol=1e-5, rtol=1e-5)
        print(f"weights @ v through the output projection equals "
              f"BertSelfAttention.forward: {matches}")
    return weights[0]  # (heads, seq, seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--layer", type=int, default=0, help="encoder layer to draw (from 0)")
    parser.add_argument("--text", default=SENTENCE, help="the sentence to draw")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "attention_map.png",
                        help="where to write the attention map")
    parser.add_argument("--masks-out", type=Path, default=None,
                        help="where to write the picture of the masks (default: "
                             "attention_masks.png beside --out)")
    args = parser.parse_args()
    args.masks_out = args.masks_out or args.out.parent / "attention_masks.png"
    folder = args.assets / "checkpoints" / "bert-tiny-splade-mlm"
    tokenizer = load_tokenizer(folder)
    model = load_pretrained(folder)
    encoding = tokenizer.encode(args.text)
    tokens = encoding.tokens
    weights = attention_weights(model, torch.tensor([encoding.ids]), args.layer)
    heads, seq, _ = weights.shape
    print(f"layer {args.layer}: {heads} heads, {seq} tokens: {' '.join(tokens)}")

    # A per-head summary in the spirit of Clark et al. 2019, "What Does BERT Look At?":
    # the average weight that a query puts on itself, on [CLS], on [SEP], on its neighbours.
    index = torch.arange(seq)
    for h in range(heads):
        w = weights[h]
        parts = {
            "self": w[index, index].mean(),
            "[CLS]": w[:, 0].mean(),
            "[SEP]": w[:, -1].mean(),
            "previous": w[index[1:], index[1:] - 1].mean(),
            "next": w[index[:-1], index[:-1] + 1].mean(),
        }
        summary = ", ".join(f"{name} {value:.2f}" for name, value in parts.items())
        print(f"head {h}: mean weight on {summary}")
        strongest = " ".join(f"{tokens[q]}->{tokens[k]}" for q, k in enumerate(w.argmax(-1).tolist()))
        print(f"head {h}: strongest key per query: {strongest}")

    fig, axes = plt.subplots(1, heads, figsize=(5.6 * heads, 6.4), squeeze=False,
                             layout="constrained")
    for h, ax in enumerate(axes[0]):
        w = weights[h].numpy()
        # Its own scale: a head that spreads its weight is not a flat dark field.
        image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=float(w.max()))
        ax.scatter(w.argmax(axis=1), range(seq), s=70, facecolors="none", edgecolors="red",
                   linewidths=1.4)
        ax.set_title(f"layer {args.layer}, head {h}")
        ax.set_xticks(range(seq), tokens, rotation=90)
        ax.set_yticks(range(seq), tokens)
        ax.set_xlabel("key (attended to)")
        if h == 0:
            ax.set_ylabel("query (attending)")
        fig.colorbar(image, ax=ax, shrink=0.75, label=f"weight (scale 0 to {w.max():.2f})")
    fig.suptitle("bert-tiny attention: each row is one query's softmax over the keys;\n"
                 "red circle: the row's largest weight")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out.name}: each head on its own scale, the largest weight of each row "
          f"circled")
    draw_masks(tokenizer, args.masks_out)


def draw_masks(tokenizer, out: Path) -> None:
    """Padding, bidirectional and causal masks on chapter 1.2's batch: True = may attend."""
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    batch = tokenizer.encode_batch(list(BATCH))
    attention_mask = torch.tensor([e.attention_mask for e in batch])  # (2, seq)
    seq = attention_mask.shape[1]
    padding = _key_padding_mask(attention_mask).expand(-1, -1, seq, -1)[1, 0]  # (seq, seq)
    panels = [
        ("padding: sentence 2's [PAD] keys", batch[1].tokens, padding),
        ("BERT: every token sees every token", batch[0].tokens, torch.ones(seq, seq).bool()),
        ("GPT (not BERT): causal, left only", batch[0].tokens,
         torch.ones(seq, seq).bool().tril()),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 6.6), layout="constrained")
    for ax, (title, tokens, allowed) in zip(axes, panels):
        ax.imshow(allowed.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks(range(seq), tokens, rotation=90)
        ax.set_yticks(range(seq), tokens)
        ax.set_xlabel("key")
    axes[0].set_ylabel("query")
    fig.suptitle("attention masks: white = may attend; black = weight exactly 0 "
                 "(the score is -inf before the softmax)")
    fig.savefig(out, dpi=100)
    print(f"wrote {out.name}: padding {int((~padding).sum())} of {seq * seq} (query, key) pairs "
          f"of sentence 2 masked, causal {int((~torch.ones(seq, seq).bool().tril()).sum())}, "
          f"BERT's own 0")


if __name__ == "__main__":
    main()
