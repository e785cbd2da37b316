"""BERT's kin (RoBERTa, DistilBERT, ELECTRA, BERT-large) read, written and run as
transformers runs them.

Parity: the same weights give the same hidden states and logits as the family's own
transformers class (fp32, CPU, a padded batch), on the real trained RoBERTa of the shared
assets and on randomly initialised models of the published shapes, fewer layers for time,
with every LayerNorm and bias perturbed (at initialisation they are 1 and 0, and a swapped
pair would go unnoticed). Round trips: HuggingFace -> minibert -> HuggingFace is bit-exact
and loads into the family's class with nothing missing.

Tolerance: 1e-4 absolute on fp32 outputs of magnitude ~1-10 (logits here reach 1 to 6), i.e.
about 1e-5 relative: two implementations adding the same fp32 products in another order
differ by a few 1e-6 here, while a mis-mapped tensor moves them by 1e-2 or more (one
LayerNorm bias moved by 1e-3 already moves the logits by 1e-4).
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ASSETS, BERT_TINY, REPO
from minibert import MinibertError, load_pretrained, load_tokenizer
from minibert.checkpoint import random_init, read_checkpoint
from minibert.convert import config_from_hf, hf_to_minibert
from minibert.evaluate import check_block_length
from minibert.model import BertForMaskedLM
from minibert.train_config import TrainConfig
from test_train import by_step, config_flags, read_metrics, run_cli

transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4
SAPIENS = ASSETS / "checkpoints" / "sapiens-roberta-vh-mlm"
ROBERTA_TOKENIZER = ASSETS / "tokenizer" / "roberta-base"
ELECTRA_SMALL = dict(embedding_size=128, hidden_size=256, num_attention_heads=4,
                     intermediate_size=1024)

# The published shapes (2 or 4 layers instead of 6 to 24, for time).
SHAPES = {
    "roberta-base": ("RobertaForMaskedLM", "RobertaConfig", dict(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        num_hidden_layers=2)),
    "distilbert-base-uncased": ("DistilBertForMaskedLM", "DistilBertConfig", dict(n_layers=2)),
    "electra-small-generator": ("ElectraForMaskedLM", "ElectraConfig",
                                dict(**ELECTRA_SMALL, num_hidden_layers=4)),
    "electra-small-discriminator": ("ElectraForPreTraining", "ElectraConfig",
                                    dict(**ELECTRA_SMALL, num_hidden_layers=4)),
    "bert-large": ("BertForMaskedLM", "BertConfig", dict(
        hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=2)),
}


def perturbed_hf_model(class_name: str, config_name: str, **shape):
    """A random transformers model with every LayerNorm and bias away from 1 and 0."""
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**shape)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def minibert_from(hf_model) -> tuple[BertForMaskedLM, list[str]]:
    config = config_from_hf(hf_model.config.to_dict())
    state, notices = hf_to_minibert(hf_model.state_dict(), config.family)
    model = BertForMaskedLM(config)
    if not any(k.startswith("mlm_head.") for k in state):  # the ELECTRA discriminator
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("mlm_head.")})
    model.load_state_dict(state)
    return model.eval(), notices


def padded_ids(vocab_size: int, pad: int, seq: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab_size, (2, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, seq // 3:] = 0  # the second row is two-thirds padding
    return ids.masked_fill(mask == 0, pad), mask


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", SHAPES)
@torch.no_grad()
def test_parity_with_the_familys_own_class(name):
    reference = perturbed_hf_model(SHAPES[name][0], SHAPES[name][1], **SHAPES[name][2])
    ours, notices = minibert_from(reference)
    assert ours.config.family == reference.config.model_type
    ids, mask = padded_ids(reference.config.vocab_size, reference.config.pad_token_id)
    out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden_diff = max_diff(ours.bert(ids, mask), out.hidden_states[-1])
    line = f"{name}: hidden {hidden_diff:.2e}"
    assert hidden_diff <= TOLERANCE
    if "discriminator" in name:  # no masked-LM head: only the encoder is compared
        assert notices == ["dropped the discriminator's replaced-token head "
                           "discriminator_predictions (4 tensors): minibert trains and "
                           "exports masked-LM only"]
    else:
        logits_diff = max_diff(ours(ids, mask), out.logits)
        line += f", logits {logits_diff:.2e} (max |logit| {out.logits.abs().max():.1f})"
        assert logits_diff <= TOLERANCE
    print(line)


@torch.no_grad()
def test_parity_real_roberta_checkpoint():
    """The trained sapiens RoBERTa (4 layers, 146 positions, pad 1, eps 1e-5), compared on
    token ids (its vocabulary is amino acids), one row padded."""
    reference = transformers.RobertaForMaskedLM.from_pretrained(str(SAPIENS)).eval()
    ours = load_pretrained(SAPIENS)
    assert (ours.config.family, ours.config.max_sequence_length) == ("roberta", 144)
    ids, mask = padded_ids(25, pad=1, seq=144)  # the longest input its positions hold
    ids[:, 0], ids[0, -1], ids[1, 47] = 0, 2, 2  # <s> ... </s>
    out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden_diff = max_diff(ours.bert(ids, mask), out.hidden_states[-1])
    logits_diff = max_diff(ours(ids, mask), out.logits)
    print(f"sapiens-roberta-vh-mlm: hidden {hidden_diff:.2e}, logits {logits_diff:.2e} "
          f"(max |logit| {out.logits.abs().max():.1f})")
    assert hidden_diff <= TOLERANCE and logits_diff <= TOLERANCE
    # Positions skip the padding: a row gives the same logits padded or alone.
    alone = ours(ids[1:, :48])
    assert max_diff(alone, ours(ids, mask)[1:, :48]) <= TOLERANCE
    # 146 positions hold 144 tokens: blocks and sentences are held to that.
    check_block_length(144, ours)
    with pytest.raises(MinibertError, match=r"\(146: 144 tokens, counted from pad_token_id"):
        check_block_length(145, ours)
    from minibert.fill_mask import fill_masks
    too_long = fill_masks(ours, load_tokenizer(SAPIENS), ["A" * 142 + "<mask>"])[0]
    assert "only 144 positions" in too_long["error"]["message"]


def convert(*args: str) -> None:
    """convert_weights.py SRC DST [--to-hf], in this process."""
    from minibert.convert_cli import convert as run, parse_args
    run(parse_args([str(a) for a in args]))


def save_hf(model, folder, tokenizer_source=None):
    """save_pretrained, and the tokenizer files the family reads."""
    model.save_pretrained(folder)
    for name in ("vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json"):
        if tokenizer_source is not None and (tokenizer_source / name).is_file():
            shutil.copyfile(tokenizer_source / name, folder / name)
    return folder


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
ROUND_TRIPS = {
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(
        TINY, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5), ROBERTA_TOKENIZER),
    "distilbert": ("DistilBertForMaskedLM", "DistilBertConfig", dict(
        dim=32, n_layers=2, n_heads=2, hidden_dim=64), BERT_TINY),
    "electra-generator": ("ElectraForMaskedLM", "ElectraConfig", dict(TINY, embedding_size=16),
                          BERT_TINY),
    "electra-discriminator": ("ElectraForPreTraining", "ElectraConfig",
                              dict(TINY, embedding_size=16), BERT_TINY),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_is_bit_exact_and_loads_in_the_familys_class(name, tmp_path, capsys):
    class_name, config_name, shape, vocabulary = ROUND_TRIPS[name]
    reference = perturbed_hf_model(class_name, config_name, **shape)
    source = save_hf(reference, tmp_path / "src", vocabulary)
    convert(source, tmp_path / "mini")
    assert json.loads((tmp_path / "mini" / "config.json").read_text())["family"] == \
        reference.config.model_type
    convert(tmp_path / "mini", tmp_path / "hf", "--to-hf")
    original = load_file(source / "model.safetensors")
    written = load_file(tmp_path / "hf" / "model.safetensors")
    head = "discriminator_predictions."
    kept = {k: v for k, v in original.items() if not k.startswith(head)}
    for key, tensor in kept.items():
        assert torch.equal(tensor, written[key]), key
    masked_lm = getattr(transformers, class_name.replace("PreTraining", "MaskedLM"))
    model, info = masked_lm.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[1, 5, 17, 200, 2]])
    with torch.no_grad():
        assert max_diff(model.eval()(input_ids=ids).logits,
                        load_pretrained(tmp_path / "mini")(ids)) <= TOLERANCE
    if "discriminator" in name:  # a fresh masked-LM head was added, and said so
        assert set(written) - set(kept) == {"generator_predictions.dense.weight",
                                            "generator_predictions.dense.bias",
                                            "generator_predictions.LayerNorm.weight",
                                            "generator_predictions.LayerNorm.bias",
                                            "generator_lm_head.bias"}
        assert "no masked-LM head" in capsys.readouterr().out
    else:
        assert set(written) == set(kept)


def test_what_minibert_does_not_model_is_refused_in_one_line(tmp_path):
    config = transformers.DistilBertConfig(n_layers=1).to_dict()
    with pytest.raises(MinibertError, match="sinusoidal_pos_embds is true"):
        config_from_hf({**config, "sinusoidal_pos_embds": True})
    roberta = transformers.RobertaConfig().to_dict()
    with pytest.raises(MinibertError, match="a roberta model has hidden_act 'gelu'"):
        config_from_hf({**roberta, "hidden_act": "relu"})  # RobertaLMHead's gelu is fixed
    with pytest.raises(MinibertError, match="model_type is 'albert'"):
        config_from_hf({**roberta, "model_type": "albert"})
    # A [model_config] that breaks the family is refused before training, not at export.
    (tmp_path / "config.json").write_text(json.dumps(roberta))
    shutil.copyfile(ROBERTA_TOKENIZER / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(MinibertError, match="pad_offset_positions True"):
        random_init(tmp_path, seed=0, overrides={"pad_offset_positions": False})


def test_init_random_from_a_bpe_vocabulary_is_roberta_base_shaped():
    model, _, notices = random_init(ROBERTA_TOKENIZER, seed=0,
                                    overrides={"num_hidden_layers": 1, "hidden_size": 32,
                                               "num_attention_heads": 2,
                                               "intermediate_size": 64})
    config = model.config
    assert (config.family, config.vocab_size, config.max_position_embeddings,
            config.pad_token_id, config.type_vocab_size, config.layer_norm_eps) == \
        ("roberta", 50265, 514, 1, 1, 1e-5)
    assert "roberta-base's shape" in notices[0]


def test_fill_mask_refuses_the_electra_discriminator(tmp_path):
    reference = perturbed_hf_model("ElectraForPreTraining", "ElectraConfig",
                                   **dict(TINY, embedding_size=16))
    save_hf(reference, tmp_path / "discriminator", BERT_TINY)
    with pytest.raises(MinibertError, match="has no masked-LM head"):
        read_checkpoint(tmp_path / "discriminator", require_head=True)
    assert load_tokenizer(tmp_path / "discriminator").token_to_id("[MASK]") == 103


# ---------------------------------------------------------------------------------------------
# End to end: a RoBERTa and a DistilBERT checkpoint go convert -> fine-tune on 2 processes ->
# fill-mask -> --to-hf -> transformers' fill-mask pipeline, which must list the same top 5.

CORPUS = ASSETS / "corpus" / "wikipedia-sample"


def tiny_corpus(folder):
    folder.mkdir()
    (folder / "train.txt").write_text(
        (CORPUS / "train.txt").read_text(encoding="utf-8")[:6000].rsplit("\n", 1)[0] + "\n",
        encoding="utf-8")
    (folder / "valid.txt").write_text(
        (CORPUS / "valid.txt").read_text(encoding="utf-8")[:1200].rsplit(" ", 1)[0] + "\n",
        encoding="utf-8")
    return folder


def train_config(model, data, out_dir, cache_dir, **overrides) -> TrainConfig:
    settings = dict(model=str(model), data=str(data), out_dir=str(out_dir),
                    cache_dir=str(cache_dir), max_seq_length=32, batch_size=2, max_steps=4,
                    lr=1e-3, warmup_steps=1, precision="fp32", device="cpu", dropout=0.0,
                    log_every=1, eval_every=0, save_every=0, seed=3, whole_word_mask=True)
    return TrainConfig(**{**settings, **overrides})


def losses(out_dir, key: str) -> dict[int, float]:
    return by_step(read_metrics(out_dir), key)


def spread_head_bias(hf_model) -> None:
    """A random model's guesses are all about 1 / vocab_size, so its top 5 would be ordered
    by differences near rounding: a head bias of spread 3 separates them (by >1% here)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if name in ("lm_head.bias", "vocab_projector.bias"):
                parameter.normal_(0.0, 3.0)


def end_to_end(tmp_path, capsys, source, text: str, one_process: bool) -> list[dict]:
    """convert -> fine-tune on 2 processes (and on 1, compared) -> fill-mask, score and
    evaluate -> --to-hf -> transformers' pipeline; returns the pipeline's top 5."""
    from minibert import evaluate, fill_mask, score
    from minibert.trainer import train

    convert(source, tmp_path / "mini")
    corpus, cache = tiny_corpus(tmp_path / "corpus"), tmp_path / "cache"
    # test_train.py's way of running train.py on 2 processes
    config = train_config(tmp_path / "mini", corpus, tmp_path / "two", cache)
    result = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node=2", "train.py", *config_flags(config)])
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "two" / "final"
    if one_process:
        train(train_config(tmp_path / "mini", corpus, tmp_path / "one", cache, batch_size=4),
              environ={})
        for key in ("train_loss", "eval_loss"):
            two, one = losses(tmp_path / "two", key), losses(tmp_path / "one", key)
            assert two.keys() == one.keys() and len(two) >= 2
            difference = max(abs(two[k] - one[k]) for k in two)
            with capsys.disabled():
                print(f"\n{key}: 2 processes vs 1, max difference {difference:.2e}")
            assert difference < 1e-5

    capsys.readouterr()
    assert fill_mask.run(fill_mask.parse_args(["--model", str(final), "--json", text])) == 0
    ours = json.loads(capsys.readouterr().out)["predictions"]
    score.run(score.parse_args(["--model", str(final), "--json", text.replace("[MASK]", "a")]))
    assert json.loads(capsys.readouterr().out)["pll"] < 0
    with pytest.raises(SystemExit) as status:
        evaluate.main(["--model", str(final), "--data", str(corpus), "--json", "--device=cpu",
                       "--max_seq_length=32", "--cache_dir", str(cache), "--whole_word_mask",
                       "--precision=fp32"])
    assert status.value.code == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(losses(tmp_path / "two", "eval_loss")[4], rel=1e-5)
    # (the run's own last evaluation, reproduced by the command: same blocks, same masks)

    convert(final, tmp_path / "hf", "--to-hf")
    pipeline = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), top_k=5)
    mask = pipeline.tokenizer.mask_token
    theirs = pipeline(text.replace("[MASK]", mask))
    with capsys.disabled():  # for -s: the two top-5 lists, side by side
        print("\nminibert:", [(p["token_id"], round(p["score"], 5)) for p in ours])
        print("pipeline:", [(p["token"], round(p["score"], 5)) for p in theirs])
    scores = [p["score"] for p in ours]
    assert all(a > b * 1.01 for a, b in zip(scores, scores[1:])), scores  # a clear order
    assert [p["token_id"] for p in ours] == [p["token"] for p in theirs]
    assert scores == pytest.approx([p["score"] for p in theirs], rel=1e-4)
    return theirs


def test_end_to_end_roberta(tmp_path, capsys):
    """A tiny random RoBERTa with roberta-base's tokenizer; 1 and 2 processes must agree.
    [MASK] typed for it is read as <mask>, with a note."""
    reference = perturbed_hf_model(*ROUND_TRIPS["roberta"][:2], **ROUND_TRIPS["roberta"][2])
    spread_head_bias(reference)
    source = save_hf(reference, tmp_path / "src", ROBERTA_TOKENIZER)
    end_to_end(tmp_path, capsys, source, "The capital of France is [MASK].", one_process=True)
    from minibert import fill_mask
    fill_mask.run(fill_mask.parse_args(["--model", str(tmp_path / "two" / "final"),
                                        "Paris is the [MASK] of France."]))
    assert "note: [MASK] is read as <mask>" in capsys.readouterr().err


def test_end_to_end_distilbert(tmp_path, capsys):
    """A tiny random DistilBertForMaskedLM with the bert-base-uncased vocabulary."""
    reference = perturbed_hf_model(*ROUND_TRIPS["distilbert"][:2], **ROUND_TRIPS["distilbert"][2])
    spread_head_bias(reference)
    source = save_hf(reference, tmp_path / "src", ASSETS / "tokenizer" / "bert-base-uncased")
    end_to_end(tmp_path, capsys, source, "The capital of France is [MASK].", one_process=False)


def test_init_random_electra_from_a_config_alone_trains_and_goes_back(tmp_path):
    """init = "random" from an ELECTRA config.json and a vocabulary (no weights), its
    embedding width set in [model_config]: trains, and exports as ElectraForMaskedLM."""
    from minibert.train_config import parse_config
    from minibert.trainer import train

    source = tmp_path / "electra"
    source.mkdir()
    config = transformers.ElectraConfig(**TINY, embedding_size=16).to_dict()
    (source / "config.json").write_text(json.dumps(config))
    shutil.copyfile(BERT_TINY / "vocab.txt", source / "vocab.txt")
    corpus = tiny_corpus(tmp_path / "corpus")
    config = train_config(source, corpus, tmp_path / "run", tmp_path / "cache", max_steps=2,
                          init="random", whole_word_mask=False)
    train(parse_config([*config_flags(config), "--model_config", "{embedding_size = 8}"]),
          environ={})
    written = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert (written["family"], written["embedding_size"], written["hidden_size"]) == \
        ("electra", 8, 32)
    convert(tmp_path / "run" / "final", tmp_path / "hf", "--to-hf")
    model, info = transformers.ElectraForMaskedLM.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and model.config.embedding_size == 8
