"""The model on its own: config validation, attention math, shapes, padding, tied head."""

import pytest
import torch

from minibert.model import BertConfig, BertForMaskedLM, BertModel, attention_reference

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40)


def tiny_model(**overrides) -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive"),
    (dict(vocab_size=-3), "vocab_size must be a positive"),
    (dict(hidden_act="swish"), "hidden_act"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (dict(pad_token_id=50), "pad_token_id"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        BertConfig(**{**TINY, **bad})


def test_config_round_trips_through_dict_and_ignores_unknown_keys():
    config = BertConfig(**TINY)
    assert BertConfig.from_dict({**config.to_dict(), "architectures": ["x"]}) == config
    assert config.head_dim == 8


def test_sdpa_equals_the_written_out_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)  # (batch, heads, seq, head_dim)
    padding = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()[:, None, None, :]
    expected = attention_reference(q, k, v, padding)
    actual = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=padding)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    # Padded keys get exactly zero weight: changing them changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 4:], v2[1, :, 4:] = 100.0, -100.0
    assert torch.equal(attention_reference(q, k2, v2, padding), expected)


def test_model_attention_matches_reference_path():
    model = tiny_model()
    layer = model.bert.layers[0].attention
    x = torch.randn(2, 6, 32)
    batch, seq, hidden = x.shape
    q, k, v = layer.qkv(x).view(batch, seq, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = layer.out(attention_reference(q, k, v, None).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(layer(x, None), expected, atol=1e-6, rtol=1e-5)


def test_shapes_and_padding_does_not_leak():
    model = tiny_model()
    ids = torch.randint(5, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    hidden = model.bert(ids, mask)
    assert hidden.shape == (2, 9, 32)
    assert model(ids, mask).shape == (2, 9, 50)
    # Row 1's real tokens give the same vectors whatever sits in its padding, and the same as
    # the unpadded sequence alone.
    other = ids.clone()
    other[1, 6:] = 7
    with torch.no_grad():
        assert torch.equal(model.bert(other, mask)[1, :6], hidden[1, :6])  # the same sums
        torch.testing.assert_close(model.bert(ids[1:, :6])[0], hidden[1, :6], atol=1e-5, rtol=1e-4)


def test_attention_is_bidirectional():
    model = tiny_model()
    ids = torch.randint(5, 50, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1 - 5) % 45 + 5
    with torch.no_grad():
        first = model.bert(ids)[0, 0]
        assert not torch.allclose(first, model.bert(changed)[0, 0])  # token 0 sees the last token


def assert_decoder_tied(model: BertForMaskedLM) -> None:
    """The logits that forward() returns come from the input embedding matrix itself: they
    move when a row of it moves, and the decoder's gradient lands in it."""
    embedding = model.bert.embeddings.word_embeddings.weight
    ids = torch.tensor([[2, 3, 4, 5, 6]])  # token 7 is not an input: only the decoder uses row 7
    with torch.no_grad():
        before = model(ids)[..., 7]
        embedding[7] += 1.0
        hidden = model.mlm_head.layer_norm(model.mlm_head.activation(
            model.mlm_head.dense(model.bert(ids))))
        torch.testing.assert_close(model(ids)[..., 7] - before, hidden.sum(-1))
        embedding[7] -= 1.0
    labels = torch.full_like(ids, -100)
    labels[0, 1] = 7
    model.zero_grad()
    model(ids, labels=labels).backward()
    assert embedding.grad is not None and embedding.grad[7].abs().sum() > 0
    assert "mlm_head.decoder_weight" not in model.state_dict()


def test_decoder_is_tied_to_word_embeddings():
    assert_decoder_tied(tiny_model())


def test_the_tie_test_fails_on_an_untied_decoder():
    class Untied(BertForMaskedLM):  # the decoder gets a copy of the embeddings, then drifts apart
        def __init__(self, config):
            super().__init__(config)
            self.decoder = torch.nn.Parameter(self.bert.embeddings.word_embeddings.weight
                                              .detach().clone())

        @property
        def word_embeddings(self):
            return self.decoder

    torch.manual_seed(0)
    with pytest.raises(AssertionError):
        assert_decoder_tied(Untied(BertConfig(**TINY)).eval())


def test_masked_loss_equals_full_logits_loss():
    model = tiny_model()
    ids = torch.randint(5, 50, (3, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[2, 0], labels[2, 9] = 11, 12, 13, 14
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids).view(-1, 50), labels.view(-1))
        # Another matrix shape for the head (4 rows against 30): float32 rounding only.
        assert model(ids, labels=labels).item() == pytest.approx(full.item(), rel=1e-6)


def test_pooler_and_token_types():
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(**TINY)).eval()
    ids = torch.randint(5, 50, (2, 5))
    hidden = encoder(ids)
    assert encoder.pooler(hidden).shape == (2, 32)
    zeros = torch.zeros_like(ids)
    assert torch.equal(encoder(ids, token_type_ids=zeros), hidden)  # None means type 0
    assert not torch.allclose(encoder(ids, token_type_ids=torch.ones_like(ids)), hidden)
