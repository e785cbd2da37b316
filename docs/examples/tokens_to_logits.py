"""Chapter 1's numbers: one sentence followed from text to vocabulary logits through minibert.

    python docs/examples/tokens_to_logits.py                      # assets at ../shared/assets
    python docs/examples/tokens_to_logits.py --assets PATH
    python docs/examples/tokens_to_logits.py --text "Floccinaucinihilipilification is rare."

Every step calls the real submodules of minibert.model on the shared bert-tiny checkpoint
(2 layers, hidden 128, 2 heads) and prints the shape of the tensor it produces. Where the
script re-does a module's work by hand (the encoder layer), it checks that the result equals
the module's own forward, so the walk-through cannot describe code that does something else.
docs/01-tokens-to-logits.md quotes this output; tests/test_docs.py checks that it still does.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F

from minibert import BertConfig, BertForMaskedLM, load_pretrained, load_tokenizer
from minibert.model import _key_padding_mask, attention_reference

REPO = Path(__file__).resolve().parents[2]
SENTENCE = "Tokenization splits unfamiliar words into pieces."
SHORTER = "The cat slept."


def shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def step(what: str, t: torch.Tensor) -> torch.Tensor:
    print(f"  {what:<44} {shape(t)}")
    return t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets",
                        help="the shared assets folder (default: ../shared/assets)")
    parser.add_argument("--text", default=SENTENCE,
                        help="the sentence to follow (it is batched with 'The cat slept.')")
    args = parser.parse_args()
    folder = args.assets / "checkpoints" / "bert-tiny-splade-mlm"
    torch.manual_seed(0)
    tokenizer = load_tokenizer(folder)
    model = load_pretrained(folder)  # eval mode: dropout is off, so every step is exact
    config = model.config

    print("== 0. BertConfig ==")
    print(f"  {'field':<30} {'bert-tiny':<11} bert-base (the defaults)")
    base_config = BertConfig()
    for field in fields(BertConfig):
        print(f"  {field.name:<30} {getattr(config, field.name)!s:<11} "
              f"{getattr(base_config, field.name)}")
    print(f"  {'head_dim (a property)':<30} {config.head_dim:<11} {base_config.head_dim}")

    print("== 1. WordPiece ==")
    print(f"text: {args.text}")
    encoding = tokenizer.encode(args.text)
    print("  position  token          id")
    for position, (token, token_id) in enumerate(zip(encoding.tokens, encoding.ids)):
        print(f"  {position:<8}  {token:<13}  {token_id}")
    specials = "  ".join(f"{t}={tokenizer.token_to_id(t)}"
                         for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
    print(f"special ids: {specials}")
    print(f"vocabulary: {tokenizer.get_vocab_size()} word pieces")
    pair = tokenizer.encode("The cat sat.", "It was tired.")
    print(f"pair tokens:  {' '.join(pair.tokens)}")
    print(f"segment ids:  {' '.join(str(t) for t in pair.type_ids)}")

    print("== 2. A padded batch ==")
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    batch = tokenizer.encode_batch([args.text, SHORTER])
    input_ids = torch.tensor([e.ids for e in batch])
    attention_mask = torch.tensor([e.attention_mask for e in batch])
    print(f"second sentence: {' '.join(batch[1].tokens)}")
    print(f"input_ids      {shape(input_ids)}")
    print(f"attention_mask {shape(attention_mask)}")
    for row in attention_mask.tolist():
        print(f"  {row}")
    batch_size, seq = input_ids.shape

    print("== 3. Embeddings ==")
    emb = model.bert.embeddings
    with torch.no_grad():
        words = step("word_embeddings(input_ids)", emb.word_embeddings(input_ids))
        positions = step("position_embeddings(arange(seq))",
                         emb.position_embeddings(torch.arange(seq)))
        segments = step("token_type_embeddings(zeros)",
                        emb.token_type_embeddings(torch.zeros_like(input_ids)))
        x = step("layer_norm(words + positions + segments)",
                 emb.layer_norm(words + positions + segments))
        print(f"  same as BertEmbeddings.forward: {same(x, emb(input_ids, None))}")

    print("== 4. Encoder layer 0, step by step ==")
    layer = model.bert.layers[0]
    attn = layer.attention
    heads, head_dim = attn.num_heads, attn.head_dim
    print(f"hidden {config.hidden_size}, heads {heads}, head_dim {head_dim}, "
          f"intermediate {config.intermediate_size}")
    with torch.no_grad():
        key_padding_mask = step("key_padding_mask from attention_mask",
                                _key_padding_mask(attention_mask))
        h0 = step("x (the embeddings)", x)
        qkv = step("qkv(x)", attn.qkv(h0))
        qkv = step("view(batch, seq, 3, heads, head_dim)",
                   qkv.view(batch_size, seq, 3, heads, head_dim))
        qkv = step("permute(2, 0, 3, 1, 4)", qkv.permute(2, 0, 3, 1, 4))
        q, k, v = qkv.unbind(0)
        step("q, k, v = unbind(0): each", q)
        scores = step("(q / sqrt(head_dim)) @ k.transpose(-2, -1)",
                      (q / math.sqrt(head_dim)) @ k.transpose(-2, -1))
        scores = step("masked_fill(~key_padding_mask, -inf)",
                      scores.masked_fill(~key_padding_mask, float("-inf")))
        weights = step("softmax(dim=-1)", scores.softmax(dim=-1))
        context = step("weights @ v", weights @ v)
        print(f"  same as attention_reference(q, k, v, mask): "
              f"{same(context, attention_reference(q, k, v, key_padding_mask))}")
        context = step("transpose(1, 2).reshape(batch, seq, hidden)",
                       context.transpose(1, 2).reshape(batch_size, seq, config.hidden_size))
        attended = step("out(context)", attn.out(context))
        h1 = step("attention_norm(x + attention)", layer.attention_norm(h0 + attended))
        inner = step("intermediate(x)", layer.intermediate(h1))
        inner = step("gelu", layer.activation(inner))
        ffn = step("output(h)", layer.output(inner))
        h2 = step("output_norm(x + feed_forward)", layer.output_norm(h1 + ffn))
        print(f"  same as BertLayer.forward: {same(h2, layer(h0, key_padding_mask))}")
        grid = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
        gap = (F.gelu(grid) - F.gelu(grid, approximate="tanh")).abs().max()
        print(f"  hidden_act {config.hidden_act!r}: the exact x * Phi(x); its tanh approximation "
              f"differs by at most {gap:.5f}")
        real = weights.sum(dim=-1)
        print(f"  every row of weights sums to 1: {same(real, torch.ones_like(real))}")
        short = int(attention_mask.sum(dim=1).argmin())  # the sentence that is padded
        pads = ~attention_mask[short].bool()
        if pads.any():
            print(f"  weight on the {int(pads.sum())} [PAD] keys of sentence {short + 1}, any "
                  f"query, any head: {weights[short, :, :, pads].abs().max().item():.1f}")
        else:
            print("  no [PAD] keys: both sentences have the same length")

    print("== 5. Padding changes nothing for real tokens ==")
    with torch.no_grad():
        padded = model.bert(input_ids, attention_mask)
        n = int(attention_mask[short].sum())
        alone = model.bert(input_ids[short:short + 1, :n])
        print(f"  sentence {short + 1} padded to {seq} tokens vs alone ({n} tokens), "
              f"same hidden states: {same(padded[short, :n], alone[0])}")

    print("== 6. No causal mask: the first word sees the last ==")
    ids = torch.tensor([encoding.ids])
    # The last word piece before [SEP] that is not punctuation, replaced by another word.
    where = max((i for i, token in enumerate(encoding.tokens[1:-1], start=1)
                 if any(c.isalnum() for c in token)), default=len(encoding.tokens) - 2)
    old, new = encoding.tokens[where], "fragments"
    edited = ids.clone()
    edited[0, where] = tokenizer.token_to_id(new)
    with torch.no_grad():
        before = model.bert(ids)[0, 1]
        after = model.bert(edited)[0, 1]
    print(f"  replace {old!r} (position {where}) by {new!r}; "
          f"hidden state of {encoding.tokens[1]!r} (position 1) changes: {not same(before, after)}")

    print("== 7. Masked-LM head ==")
    head = model.mlm_head
    with torch.no_grad():
        hidden = step("hidden states (last layer)", model.bert(input_ids, attention_mask))
        t = step("dense + gelu + layer_norm", head.layer_norm(head.activation(head.dense(hidden))))
        logits = step("F.linear(h, word_embeddings, bias)",
                      F.linear(t, model.word_embeddings, head.bias))
        print(f"  same as BertForMaskedLM.forward: "
              f"{same(logits, model(input_ids, attention_mask))}")
        labels = torch.full_like(input_ids, -100)
        labels[0, 1], labels[0, 5], labels[1, 3] = input_ids[0, 1], input_ids[0, 5], input_ids[1, 3]
        masked, targets = model.masked_logits(input_ids, labels, attention_mask)
        step("masked_logits: logits at 3 labels", masked)
        step("masked_logits: their targets", targets)
    tied = model.mlm_head.state_dict().keys()
    print(f"  mlm_head parameters: {', '.join(tied)}")
    print(f"  decoder matrix is word_embeddings.weight: "
          f"{model.word_embeddings is model.bert.embeddings.word_embeddings.weight}")
    total = sum(p.numel() for p in model.parameters())
    shared = model.word_embeddings.numel()
    print(f"  parameters: {total:,}; the shared {config.vocab_size} x {config.hidden_size} "
          f"matrix is {shared:,} of them ({100 * shared / total:.0f}%)")

    with torch.device("meta"):  # shapes only: no memory, no time spent initialising
        base = BertForMaskedLM(BertConfig())
    total, shared = sum(p.numel() for p in base.parameters()), base.word_embeddings.numel()
    print(f"  bert-base shape (BertConfig() defaults): {total:,} parameters; the shared "
          f"matrix is {shared:,} of them ({100 * shared / total:.0f}%)")

    print("== 8. A guess for [MASK] ==")
    text = "The capital of France is [MASK]."
    tokenizer.no_padding()
    e = tokenizer.encode(text)
    with torch.no_grad():
        probs = model(torch.tensor([e.ids]))[0, e.tokens.index("[MASK]")].softmax(-1)
    top = probs.topk(5)
    guesses = ", ".join(f"{tokenizer.id_to_token(i)} {p:.2f}"
                        for p, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"  {text} -> {guesses}")


if __name__ == "__main__":
    main()
