"""Draw docs/images/attention_map.png: what each head of one layer looks at, for one sentence.

    python docs/examples/attention_map.py                           # layer 0, the default sentence
    python docs/examples/attention_map.py --layer 1 --text "Your own sentence."
    python docs/examples/attention_map.py --assets PATH --out /tmp/map.png

The model calls F.scaled_dot_product_attention, which never hands the weights back. This
script recomputes them as minibert.model.attention_reference does, softmax(Q K^T / sqrt(d)),
from the layer's own fused qkv projection, and checks that multiplying them into V and
through the output projection gives exactly what BertSelfAttention.forward returns.
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

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "The cat sat on the mat because it was warm."


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
                        help="where to write the picture")
    args = parser.parse_args()
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

    fig, axes = plt.subplots(1, heads, figsize=(5.0 * heads + 1.0, 5.2), squeeze=False,
                             layout="constrained")
    for h, ax in enumerate(axes[0]):
        image = ax.imshow(weights[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {args.layer}, head {h}")
        ax.set_xticks(range(seq), tokens, rotation=90)
        ax.set_yticks(range(seq), tokens)
        ax.set_xlabel("key (attended to)")
        if h == 0:
            ax.set_ylabel("query (attending)")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="attention weight")
    fig.suptitle("bert-tiny attention: each row is one query's softmax over the keys")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out.name}")


if __name__ == "__main__":
    main()
