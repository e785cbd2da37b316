"""Conversion between HuggingFace BERT checkpoints and minibert, checked against transformers.

Parity: the same weights give the same hidden states and logits as transformers' own
implementation (fp32, CPU, padding in the batch), for the two real checkpoints in
../shared/assets and for randomly initialised models of several shapes up to bert-base.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ASSETS, BERT_TINY, MINILM, REPO
from convert_weights import convert, parse_args
from minibert import load_pretrained, load_tokenizer
from minibert.convert import hf_to_minibert
from minibert.convert_cli import main as convert_main
from minibert.model import BertConfig, BertForMaskedLM


transformers = pytest.importorskip("transformers")
# float32 through up to 12 layers in two implementations (other kernels, other orders of
# summation): hidden states up to ~6 and logits up to ~35 (one ulp at 32: 3.8e-6). Measured on
# an AMD Zen 4: at most 2.1e-5 (bert-tiny's logits) and 1.9e-5 (MiniLM's hidden states).
TOLERANCE = 1e-4
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Albedo is the fraction of sunlight that is diffusely reflected by a body.",
             "Hi [MASK]!"]


def padded_batch(folder, sentences=SENTENCES):
    """Token ids and attention mask from minibert's tokenizer, checked against transformers'."""
    encodings = load_tokenizer(folder).encode_batch(sentences)
    length = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (length - len(e.ids)) for e in encodings])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (length - len(e.ids)) for e in encodings])
    reference = transformers.BertTokenizer.from_pretrained(str(folder))(
        sentences, padding=True, return_tensors="pt")
    assert torch.equal(reference["input_ids"], ids)
    return ids, mask


def max_diff(a, b):
    return (a - b).abs().max().item()


def perturbed_hf_model(cls, **shape):
    """A randomly initialised transformers model whose every weight (biases and LayerNorm
    included) is non-trivial, so that a wrongly mapped tensor cannot go unnoticed."""
    torch.manual_seed(0)
    model = cls(transformers.BertConfig(**shape)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def minibert_from(hf_model) -> BertForMaskedLM:
    config = BertConfig.from_dict(hf_model.config.to_dict())
    state, _ = hf_to_minibert(hf_model.state_dict())
    model = BertForMaskedLM(config)
    if not any(k.startswith("mlm_head") for k in state):
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("mlm_head")})
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def test_parity_bert_tiny_checkpoint():
    ids, mask = padded_batch(BERT_TINY)
    ours = load_pretrained(BERT_TINY)
    reference = transformers.BertForMaskedLM.from_pretrained(str(BERT_TINY)).eval()
    out = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden_diff = max_diff(ours.bert(ids, mask), out.hidden_states[-1])
    logits_diff = max_diff(ours(ids, mask), out.logits)
    print(f"bert-tiny-splade-mlm: hidden {hidden_diff:.2e} logits {logits_diff:.2e}")
    assert hidden_diff <= TOLERANCE and logits_diff <= TOLERANCE


@torch.no_grad()
def test_parity_minilm_checkpoint():
    ids, mask = padded_batch(MINILM)
    ours = load_pretrained(MINILM)
    reference = transformers.BertModel.from_pretrained(str(MINILM)).eval()
    hidden_diff = max_diff(ours.bert(ids, mask),
                           reference(input_ids=ids, attention_mask=mask).last_hidden_state)
    print(f"minilm-l6-h384-uncased: hidden {hidden_diff:.2e}")
    assert hidden_diff <= TOLERANCE


@torch.no_grad()
def test_parity_minilm_pooled_output():
    """The pooler is kept: BertModel's pooled output is transformers' pooler_output."""
    ids, mask = padded_batch(MINILM)
    ours = load_pretrained(MINILM)
    reference = transformers.BertModel.from_pretrained(str(MINILM)).eval()
    hidden, pooled = ours.bert(ids, mask, return_pooled=True)
    out = reference(input_ids=ids, attention_mask=mask)
    pooled_diff = max_diff(pooled, out.pooler_output)
    print(f"minilm-l6-h384-uncased: pooled {pooled_diff:.2e}")
    assert pooled.shape == (len(SENTENCES), 384) and pooled_diff <= TOLERANCE
    assert max_diff(hidden, out.last_hidden_state) <= TOLERANCE
    with pytest.raises(ValueError, match="without a pooler"):
        load_pretrained(BERT_TINY).bert(ids, mask, return_pooled=True)  # a BertForMaskedLM


SHAPES = {
    "2 layers, hidden 64": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=256),
    "small, gelu_new": dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4,
                            num_attention_heads=4, intermediate_size=1024, hidden_act="gelu_new"),
    "bert-base": dict(),  # transformers' defaults are bert-base: 12 x 768, 12 heads
}


@pytest.mark.parametrize("name", SHAPES)
@torch.no_grad()
def test_parity_random_models(name):
    seq = 512 if name == "bert-base" else 64
    reference = perturbed_hf_model(transformers.BertForMaskedLM, **SHAPES[name])
    ours = minibert_from(reference)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, reference.config.vocab_size, (2, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, seq // 3:] = 0  # the second row is padded for two thirds of its length
    types = torch.zeros_like(ids)
    types[:, seq // 6:] = 1
    out = reference(input_ids=ids, attention_mask=mask, token_type_ids=types,
                    output_hidden_states=True)
    # One forward pass gives both: the encoder's output on its way to the head (at bert-base
    # x 512 a pass is seconds).
    encoder_output = []
    hook = ours.bert.register_forward_hook(lambda module, args, out: encoder_output.append(out))
    logits = ours(ids, mask, types)
    hook.remove()
    hidden_diff = max_diff(encoder_output[0], out.hidden_states[-1])
    logits_diff = max_diff(logits, out.logits)
    print(f"{name} seq {seq}: hidden {hidden_diff:.2e} logits {logits_diff:.2e}")
    assert hidden_diff <= TOLERANCE and logits_diff <= TOLERANCE


def run_convert_process(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "convert_weights.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})


def run_convert(*args) -> subprocess.CompletedProcess:
    """What `python convert_weights.py ARGS` runs (convert_cli.main), in this process: a new
    interpreter per call would import torch again, a second or more each. Warnings are
    written to stderr under a fresh interpreter's filters, as the command would print them.
    tests/test_cli.py runs the script itself in a real process."""
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # a fresh interpreter's filters: these four are hidden
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                       ResourceWarning):
            warnings.simplefilter("ignore", hidden)  # inserted in front of "default"
        with pytest.raises(SystemExit) as status:
            convert_main(argv)
    for warning in caught:
        stderr.write(warnings.formatwarning(warning.message, warning.category,
                                            warning.filename, warning.lineno))
    return subprocess.CompletedProcess(argv, status.value.code, stdout.getvalue(),
                                       stderr.getvalue())


def modern(name):
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


@pytest.mark.parametrize("source", [BERT_TINY, MINILM], ids=lambda p: p.name)
def test_round_trip_is_bit_exact_and_loads_in_transformers(source, tmp_path):
    assert run_convert(source, tmp_path / "mini").returncode == 0
    result = run_convert(tmp_path / "mini", tmp_path / "hf", "--to-hf")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "vocab.txt").read_bytes() == (source / "vocab.txt").read_bytes()
    original = {modern(k): v for k, v in load_file(source / "model.safetensors").items()}
    original = {(k if k.startswith(("bert.", "cls.")) else f"bert.{k}"): v
                for k, v in original.items()}
    written = load_file(tmp_path / "hf" / "model.safetensors")
    common = [k for k in original if k in written]
    assert len(common) >= 20
    for key in common:
        assert original[key].dtype == written[key].dtype and torch.equal(original[key], written[key]), key
    skipped = sorted(set(original) - set(written))
    assert all(k.endswith("position_ids") for k in skipped), skipped  # the pooler is kept
    pooler = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    has_pooler = pooler <= set(original)  # MiniLM (a BertModel) has one, bert-tiny-splade not
    assert (pooler <= set(written)) == has_pooler

    model, info = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "hf"),
                                                               output_loading_info=True)
    # transformers' BertForMaskedLM has no pooler, so it reports the kept one as unexpected,
    # as it does for bert-base-uncased itself; a classifier starts from it (test below).
    assert not info["missing_keys"], info
    assert set(info["unexpected_keys"]) == (pooler if has_pooler else set()), info
    ids, mask = padded_batch(source)
    with torch.no_grad():
        assert max_diff(model.eval()(input_ids=ids, attention_mask=mask).logits,
                        load_pretrained(tmp_path / "mini")(ids, mask)) <= TOLERANCE


def write_hf_folder(folder, state, config, weights="model.safetensors"):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(BERT_TINY / "vocab.txt", folder / "vocab.txt")
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous().clone() for k, v in state.items()}, folder / weights)
    else:
        torch.save(state, folder / weights)


TINY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@torch.no_grad()
def test_pretraining_checkpoint_in_bin_with_old_names(tmp_path):
    """BertForPreTraining weights in pytorch_model.bin with TF-era gamma/beta names."""
    reference = perturbed_hf_model(transformers.BertForPreTraining, **TINY_SHAPE)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in reference.state_dict().items()}
    write_hf_folder(tmp_path / "src", state, reference.config.to_dict(), "pytorch_model.bin")
    result = run_convert(tmp_path / "src", tmp_path / "dst")
    assert result.returncode == 0, result.stderr
    assert "dropped the next-sentence head" in result.stdout
    assert "pooler" not in result.stdout  # kept, so nothing to say
    ids = torch.randint(1000, 30000, (2, 12))
    converted = load_pretrained(tmp_path / "dst")
    logits = converted(ids)
    out = reference(input_ids=ids)
    assert max_diff(logits, out.prediction_logits) <= TOLERANCE
    # The pooled output, through the kept pooler: what the NSP head read in pre-training.
    _, pooled = converted.bert(ids, return_pooled=True)
    reference_pooled = reference.bert(input_ids=ids).pooler_output
    assert max_diff(pooled, reference_pooled) <= TOLERANCE


def test_bert_model_checkpoint_gets_a_fresh_head_with_a_notice(tmp_path):
    result = run_convert(MINILM, tmp_path / "dst")
    assert result.returncode == 0
    assert "no masked-LM head" in result.stdout


def tiny_hf_folder(tmp_path, name="src", **config_changes):
    reference = perturbed_hf_model(transformers.BertForMaskedLM, **TINY_SHAPE)
    folder = tmp_path / name
    write_hf_folder(folder, reference.state_dict(), {**reference.config.to_dict(), **config_changes})
    return folder


def corrupt_truncated(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def corrupt_garbage(folder):
    (folder / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")


def remove_weights(folder):
    (folder / "model.safetensors").unlink()


def short_vocab(folder):
    lines = (folder / "vocab.txt").read_text().splitlines()
    (folder / "vocab.txt").write_text("\n".join(lines[:-10]) + "\n")


def heads_not_dividing(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))


def wrong_hidden(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))


def extra_layer(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))


def broken_json(folder):
    (folder / "config.json").write_text("{not json")


@pytest.mark.parametrize("damage, message", [
    (remove_weights, "no weights"),
    (corrupt_truncated, "corrupt or truncated"),
    (corrupt_garbage, "corrupt or truncated"),
    (short_vocab, "does not match"),
    (heads_not_dividing, "not divisible"),
    (wrong_hidden, "has shape"),
    (extra_layer, "weights lack"),
    (broken_json, "not valid JSON"),
])
def test_bad_checkpoints_give_one_line_errors_and_no_output(tmp_path, damage, message):
    source = tiny_hf_folder(tmp_path)
    damage(source)
    result = run_convert(source, tmp_path / "out" / "dst")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "dst").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_source_and_offline_hub_id(tmp_path):
    result = run_convert(tmp_path / "nothing-here", tmp_path / "dst")
    assert result.returncode == 1 and "no such folder" in result.stderr
    # A real process: the hub client reads HF_HUB_OFFLINE when it is imported.
    result = run_convert_process("bert-base-uncased", tmp_path / "dst",
                                 env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "could not be fetched" in result.stderr and "offline" in result.stderr
    assert not (tmp_path / "dst").exists()


def test_existing_destination_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    result = run_convert(BERT_TINY, tmp_path / "dst")
    assert result.returncode == 1 and "already exists" in result.stderr
    result = run_convert(BERT_TINY, tmp_path / "dst", "--overwrite")  # not a checkpoint: kept
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "replaces only a checkpoint folder" in result.stderr and "keep.txt" in result.stderr
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    (tmp_path / "dst" / "keep.txt").unlink()
    shutil.copytree(BERT_TINY, tmp_path / "dst", dirs_exist_ok=True)  # a checkpoint: replaced
    convert(parse_args([str(BERT_TINY), str(tmp_path / "dst"), "--overwrite"]))
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"]


def test_help():
    result = run_convert("--help")
    assert result.returncode == 0 and "--to-hf" in result.stdout


def test_pooler_survives_training_and_reaches_a_classifier(tmp_path):
    """HuggingFace -> minibert -> masked-LM training -> HuggingFace loses nothing that MLM did
    not change: the pooler (which MLM never reads) comes back bit-exact, and transformers'
    BertForSequenceClassification starts from it rather than from a fresh one."""
    from minibert.train_config import TrainConfig
    from minibert.trainer import train

    reference = perturbed_hf_model(transformers.BertForPreTraining, **TINY_SHAPE)
    write_hf_folder(tmp_path / "src", reference.state_dict(), reference.config.to_dict())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (ASSETS / "corpus" / "wikipedia-sample" / "train.txt").read_text(encoding="utf-8")
    (corpus / "train.txt").write_text(text[:4000], encoding="utf-8")
    (corpus / "valid.txt").write_text(text[4000:5500], encoding="utf-8")
    train(TrainConfig(model=str(tmp_path / "src"), data=str(corpus), out_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), max_seq_length=32, batch_size=4,
                      max_steps=3, lr=1e-2, warmup_steps=0, precision="fp32", device="cpu",
                      log_every=1, eval_every=0, save_every=0), environ={})
    result = run_convert(tmp_path / "run" / "final", tmp_path / "hf", "--to-hf")
    assert result.returncode == 0, result.stderr

    original = reference.state_dict()
    classifier, info = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / "hf"), num_labels=3, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}, info
    trained = classifier.state_dict()
    for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias"):
        assert torch.equal(trained[name], original[name]), name
    # ... while the weights that MLM trains did change.
    assert not torch.equal(trained["bert.encoder.layer.0.attention.self.query.weight"],
                           original["bert.encoder.layer.0.attention.self.query.weight"])
