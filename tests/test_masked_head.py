"""The masked-only MLM head: the training loss computed at the masked positions only must be
the loss of the full head (logits at every position, -100 ignored), and transformers' loss.

Computing the head at 15% of the positions is minibert's main speed-up; these tests are what
allow it: the same number, the same gradients, with and without padding.
"""

import pytest
import torch
import torch.nn.functional as F

from minibert.convert import config_to_hf, hf_to_minibert
from minibert.model import BertConfig, BertForMaskedLM

CONFIG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40)


def masked_batch(batch: int = 4, seq: int = 24, seed: int = 0, padded: bool = False):
    """Random ids, ~15% of the real (unpadded) positions labelled, -100 elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CONFIG["vocab_size"], (batch, seq), generator=generator)
    attention_mask = torch.ones_like(ids)
    if padded:
        for row, length in enumerate(torch.randint(seq // 2, seq, (batch,), generator=generator)):
            attention_mask[row, length:] = 0
            ids[row, length:] = 0  # [PAD]
    chosen = (torch.rand(batch, seq, generator=generator) < 0.15) & attention_mask.bool()
    chosen[:, 1] = True  # every row has a target, as minibert.masking guarantees
    labels = torch.where(chosen, torch.randint(5, CONFIG["vocab_size"], (batch, seq),
                                               generator=generator), -100)
    return ids, attention_mask, labels


def full_head_loss(model, ids, attention_mask, labels, reduction="mean"):
    logits = model(ids, attention_mask)  # (batch, seq, vocab), the head at every position
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                           ignore_index=-100, reduction=reduction)


def most_targets(labels: torch.Tensor) -> int:
    """The largest number of targets in a row: the fixed-shape head's smallest valid k."""
    return int((labels != -100).sum(dim=1).max())


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("gather", ["boolean", "fixed k", "fixed k + 3"])
def test_masked_head_loss_and_gradients_equal_the_full_head(padded, reduction, gather):
    # The rows of masked_batch have different numbers of targets: the fixed-shape path
    # must fill the shorter rows with ignored positions and still give the same loss.
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**CONFIG)).eval()
    ids, attention_mask, labels = masked_batch(padded=padded)
    assert len(set((labels != -100).sum(dim=1).tolist())) > 1
    max_targets = {"boolean": None, "fixed k": most_targets(labels),
                   "fixed k + 3": most_targets(labels) + 3}[gather]

    full = full_head_loss(model, ids, attention_mask, labels, reduction)
    full.backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    masked = model(ids, attention_mask, labels=labels, reduction=reduction,
                   max_targets=max_targets)
    masked.backward()

    assert abs(masked.item() - full.item()) <= 1e-5 * max(1.0, abs(full.item()))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sum_is_mean_times_the_number_of_targets():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**CONFIG)).eval()
    ids, attention_mask, labels = masked_batch()
    with torch.no_grad():
        mean = model(ids, attention_mask, labels=labels)
        total = model(ids, attention_mask, labels=labels, reduction="sum")
    count = int((labels != -100).sum())
    assert abs(total.item() - mean.item() * count) <= 1e-5 * abs(total.item())


def test_masked_logits_are_the_full_logits_at_the_masked_positions():
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**CONFIG)).eval()
    ids, attention_mask, labels = masked_batch(padded=True)
    with torch.no_grad():
        logits, targets = model.masked_logits(ids, labels, attention_mask)
        full = model(ids, attention_mask)
    is_masked = labels != -100
    torch.testing.assert_close(logits, full[is_masked], atol=1e-5, rtol=1e-5)
    assert torch.equal(targets, labels[is_masked])

    # Fixed shape: the same logits and targets in the same order, then the filling.
    with torch.no_grad():
        logits_k, targets_k = model.masked_logits(ids, labels, attention_mask,
                                                  max_targets=most_targets(labels))
    kept = targets_k != -100
    torch.testing.assert_close(logits_k[kept], full[is_masked], atol=1e-5, rtol=1e-5)
    assert torch.equal(targets_k[kept], labels[is_masked])


def full_blocks_batch(batch: int = 4, seq: int = 24):
    """Rows with the same number of targets each, as the trainer's full blocks have."""
    ids, _, labels = masked_batch(batch, seq)
    order = torch.rand(batch, seq, generator=torch.Generator().manual_seed(5)).argsort(dim=1)
    chosen = torch.zeros(batch, seq, dtype=torch.bool).scatter_(1, order[:, :4], True)
    return ids, torch.where(chosen, ids, -100)


def test_training_forward_compiles_to_one_graph_with_the_fixed_shape_head():
    # Boolean indexing has a data-dependent size: torch.compile breaks the graph around it
    # (and a GPU waits for the host). The fixed-shape gather keeps one graph.
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**CONFIG, hidden_dropout_prob=0.1,
                                       attention_probs_dropout_prob=0.1)).train()
    ids, labels = full_blocks_batch()
    torch._dynamo.reset()
    fixed = torch._dynamo.explain(model)(ids, labels=labels, reduction="sum", max_targets=4)
    assert (fixed.graph_count, fixed.graph_break_count) == (1, 0), fixed.break_reasons
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        boolean = torch._dynamo.explain(model)(ids, labels=labels, reduction="sum")
    assert boolean.graph_break_count > 0  # what the fixed path avoids
    torch._dynamo.reset()


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fixed_shape", [False, True])
def test_loss_equals_transformers_on_the_same_batch_and_weights(padded, fixed_shape):
    transformers = pytest.importorskip("transformers")
    config = BertConfig(**CONFIG)
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(transformers.BertConfig(**config_to_hf(config)))
    reference.eval()
    state, _ = hf_to_minibert(reference.state_dict())
    model = BertForMaskedLM(config).eval()
    model.load_state_dict(state)
    ids, attention_mask, labels = masked_batch(padded=padded, seed=1)

    expected = reference(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    expected.backward()
    actual = model(ids, attention_mask, labels=labels,
                   max_targets=most_targets(labels) if fixed_shape else None)
    actual.backward()

    assert abs(actual.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    # The same gradients reach the shared weights: the tied word embeddings (input and
    # decoder) and a layer's fused Q, K, V against transformers' three matrices.
    torch.testing.assert_close(model.word_embeddings.grad,
                               reference.bert.embeddings.word_embeddings.weight.grad,
                               atol=1e-6, rtol=1e-4)
    attention = reference.bert.encoder.layer[0].attention.self
    hf_qkv_grad = torch.cat([attention.query.weight.grad, attention.key.weight.grad,
                             attention.value.weight.grad])
    torch.testing.assert_close(model.bert.layers[0].attention.qkv.weight.grad, hf_qkv_grad,
                               atol=1e-6, rtol=1e-4)


def test_training_attention_on_cpu_equals_the_fused_kernel():
    # In training on a CPU the model writes attention out (attention_reference) instead of
    # calling scaled_dot_product_attention; with dropout too small to drop anything, training
    # mode must give what the fused kernel gives in eval mode, and transformers' loss.
    transformers = pytest.importorskip("transformers")
    config = BertConfig(**CONFIG, hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-12)
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(transformers.BertConfig(**config_to_hf(config)))
    model = BertForMaskedLM(config)
    model.load_state_dict(hf_to_minibert(reference.state_dict())[0])
    attention = model.bert.layers[0].attention
    for padded in (False, True):
        ids, attention_mask, labels = masked_batch(padded=padded, seed=2)
        trained = model.train()(ids, attention_mask, labels=labels)
        expected = reference.eval()(input_ids=ids, attention_mask=attention_mask,
                                    labels=labels).loss
        assert abs(trained.item() - expected.item()) <= 1e-5 * abs(expected.item())

        # The layer itself, with sharper attention than at init so that any slip shows.
        x = torch.randn(*ids.shape, CONFIG["hidden_size"])
        key_padding_mask = attention_mask.bool()[:, None, None, :] if padded else None
        with torch.no_grad():
            attention.qkv.weight.mul_(20.0)
            torch.testing.assert_close(attention.train()(x, key_padding_mask),
                                       attention.eval()(x, key_padding_mask),
                                       atol=1e-5, rtol=1e-5)
            attention.qkv.weight.div_(20.0)


def test_max_targets_below_a_rows_target_count_is_refused():
    # A k below some row's target count would drop that row's last targets: a smaller loss,
    # silently. With labels on the CPU, in eager mode, counting them costs no sync: refused.
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**CONFIG)).eval()
    ids, attention_mask, labels = masked_batch()
    k = most_targets(labels)
    with torch.no_grad():
        model(ids, attention_mask, labels=labels, max_targets=k)  # the smallest valid k
        for call in (lambda: model(ids, attention_mask, labels=labels, max_targets=k - 1),
                     lambda: model.masked_logits(ids, labels, attention_mask, max_targets=k - 1)):
            with pytest.raises(ValueError, match=f"max_targets {k - 1} .* {k} targets"):
                call()
