"""Checkpoint folders on disk: minibert's own format, HuggingFace's, and hub ids.

A minibert checkpoint folder holds
    config.json            {"model_type": "minibert", <BertConfig fields, "family" among them>}
    model.safetensors      minibert's state dict (the tied decoder matrix stored once)
    vocab.txt              the WordPiece vocabulary, when the source had one (RoBERTa's
                           byte-level BPE: vocab.json and merges.txt instead)
    tokenizer_config.json  {"do_lower_case": ...}: the settings minibert/tokenizer.py reads
A HuggingFace folder holds config.json (model_type "bert", "roberta", "distilbert" or
"electra") and model.safetensors or pytorch_model.bin. Every folder is written through
minibert/safe_write.py (a temporary beside it, fsynced, renamed into place), so a crash never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .convert import (check_family, config_from_hf, config_to_hf, hf_to_minibert,
                      minibert_to_hf)
from .errors import MinibertError
from .model import BertConfig, BertForMaskedLM
from .safe_write import atomic_folder, recover
from .tokenizer import (BYTE_LEVEL_BPE, WORDPIECE, is_lower_case, read_vocab, tokenizer_settings,
                        vocab_file)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json")
# roberta-base's shape (its config.json), for init = "random" from a BPE vocabulary alone.
ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
                "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve(source: str | Path, weights: bool = True) -> Path:
    """A local folder, or a hub id such as bert-base-uncased downloaded into the HF cache
    (without its weight files when `weights` is False)."""
    folder = Path(source)
    recover(folder)  # a replacement of this folder that a kill interrupted: finish or undo it
    if folder.is_dir():
        return folder
    if folder.exists():
        raise MinibertError(f"{folder}: not a folder (expected a checkpoint folder)")
    if not _HUB_ID.fullmatch(str(source)):
        raise MinibertError(f"{folder}: no such folder")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(
            str(source), allow_patterns=["config.json", *TOKENIZER_FILES,
                                         *(WEIGHT_FILES if weights else ())]))
    except Exception as error:  # offline, unknown id, no huggingface_hub: all end the same way
        raise MinibertError(
            f"{source}: no such folder, and the hub id could not be fetched "
            f"({type(error).__name__}); offline, pass a local checkpoint folder") from None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinibertError(f"{file.parent}: no config.json (not a checkpoint folder)") from None
    except (OSError, ValueError) as error:
        raise MinibertError(f"{file}: not valid JSON ({error})") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights, from safetensors or from a .bin loaded without running pickle code."""
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise MinibertError(f"{file}: corrupt or truncated weights ({reason})") from None
    raise MinibertError(f"{folder}: no weights (expected {' or '.join(WEIGHT_FILES)})")


def _check_shapes(state: dict[str, torch.Tensor], model: BertForMaskedLM, source: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise MinibertError(f"{source}: weights lack {missing[0]} ({len(missing)} missing)")
    for name, tensor in state.items():
        if name not in expected:
            raise MinibertError(f"{source}: unexpected weight {name!r}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MinibertError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config "
                                f"implies {tuple(expected[name].shape)}")


def _read_config(folder: Path) -> tuple[BertConfig, dict]:
    """The folder's BertConfig (from minibert's or HuggingFace's config.json), and the raw JSON."""
    raw_config = _read_json(folder / "config.json")
    try:
        if raw_config.get("model_type") == "minibert":
            return BertConfig.from_dict(raw_config), raw_config
        return config_from_hf(raw_config), raw_config
    except (ValueError, TypeError) as error:
        raise MinibertError(f"{folder / 'config.json'}: {error}") from None


def init_model(config: BertConfig, seed: int, add_pooling_layer: bool = False) -> BertForMaskedLM:
    """A BertForMaskedLM with BERT's initialisation (model.init_weights: N(0, 0.02) weights,
    zero biases, LayerNorm at identity, [PAD] row zero) drawn from `seed` alone. torch's
    global generator is neither read nor advanced, so whatever ran before, the same seed gives
    the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(config, add_pooling_layer=add_pooling_layer).eval()


def read_checkpoint(source: str | Path, *, seed: int = 0, require_head: bool = False,
                    ) -> tuple[BertForMaskedLM, Path, list[str]]:
    """Load a minibert or HuggingFace checkpoint folder (or hub id) as BertForMaskedLM.

    A BertModel checkpoint (no masked-LM head) gets a head initialised from `seed`, or, with
    require_head, is refused: an untrained head's guesses mean nothing.
    Returns (model in eval mode, the folder read, notices worth telling the user).
    """
    folder = resolve(source)
    config, raw_config = _read_config(folder)
    notices: list[str] = []
    weights = _read_weights(folder)
    if raw_config.get("model_type") == "minibert":
        state = weights
    else:
        state, notices = hf_to_minibert(weights, config.family)
    # A pooler is kept when the checkpoint has one (minibert/convert.py says why).
    model = init_model(config, seed, add_pooling_layer=any(k.startswith("bert.pooler.")
                                                           for k in state))
    if not any(k.startswith("mlm_head.") for k in state):
        if require_head:
            raise MinibertError(f"{folder}: an encoder that has no masked-LM head (BertModel, "
                                f"ELECTRA's discriminator); fine-tune it first (python "
                                f"train.py --model {folder} ...), which trains a head")
        # An encoder alone: keep the freshly initialised head so the model still runs.
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("mlm_head.")})
        notices.append("the checkpoint has no masked-LM head: a freshly initialised one was "
                       "added, so predictions are meaningless until it is trained")
    _check_shapes(state, model, folder)
    _check_vocabulary(folder, config)
    model.load_state_dict(state)
    return model.eval(), folder, notices


def _check_vocabulary(folder: Path, config: BertConfig) -> None:
    """The folder's vocabulary, when it has one, fits the config: a row of the embedding per
    token, and (where positions are counted past it, RoBERTa) the padding token at
    pad_token_id."""
    file = vocab_file(folder)
    if file is None:
        return
    vocab = read_vocab(file)
    if len(vocab) != config.vocab_size:
        raise MinibertError(f"{file}: {len(vocab)} tokens, but the word embedding matrix has "
                            f"{config.vocab_size} rows")
    pad = (BYTE_LEVEL_BPE if file.name == "vocab.json" else WORDPIECE).pad
    if config.pad_offset_positions and vocab[pad] != config.pad_token_id:
        raise MinibertError(f"{file}: {pad} is {vocab[pad]}, but pad_token_id is "
                            f"{config.pad_token_id}; positions are counted past padding")


def random_init(source: str | Path, *, seed: int, overrides: dict | None = None,
                ) -> tuple[BertForMaskedLM, Path, list[str]]:
    """A model to pretrain from scratch: the shape from the config.json of `source` with
    `overrides` (BertConfig fields) applied, weights from `init_model(config, seed)`. Only
    config.json and the vocabulary are read: a folder without weights is fine, and a folder
    with a vocabulary alone starts from bert-base's shape (BertConfig's defaults), or
    roberta-base's for a byte-level BPE vocabulary (vocab.json).
    Returns (model in eval mode, the folder read, notices worth telling the user)."""
    folder = resolve(source, weights=False)
    notices = []
    file = vocab_file(folder)
    if file is None:
        raise MinibertError(f"{folder}: no vocab.txt or vocab.json (init random reads the "
                            f"vocabulary there)")
    if (folder / "config.json").is_file():
        config, _ = _read_config(folder)
    elif file.name == "vocab.json":
        config = config_from_hf(ROBERTA_BASE)
        notices.append(f"{folder} has no config.json: the model is roberta-base's shape "
                       f"with model_config applied")
    else:
        config = BertConfig()
        notices.append(f"{folder} has no config.json: the model is bert-base's shape "
                       f"(BertConfig's defaults) with model_config applied")
    try:
        config = replace(config, **(overrides or {}))
    except (ValueError, TypeError) as error:
        raise MinibertError(f"model_config: {error}") from None
    check_family(config)  # a [model_config] that its family's HuggingFace class cannot be
    vocab_size = len(read_vocab(file))
    if vocab_size != config.vocab_size:
        raise MinibertError(f"vocab_size {config.vocab_size} does not match {file} "
                            f"({vocab_size} tokens): the embedding has a row per token")
    _check_vocabulary(folder, config)
    return init_model(config, seed), folder, notices


def load_pretrained(path: str | Path) -> BertForMaskedLM:
    """A BertForMaskedLM in eval mode from a minibert or HuggingFace folder, or a hub id."""
    return read_checkpoint(path)[0]


def _tokenizer_files(source: Path | None, tmp: Path) -> None:
    """Copy the vocabulary beside the weights, with the tokenizer settings it is read with:
    vocab.txt and whether it is lower-cased (and its accents, Chinese characters), or
    vocab.json and merges.txt and RoBERTa's <mask>, which takes the space before it."""
    file = None if source is None else vocab_file(source)
    if file is None:
        return
    settings = tokenizer_settings(source)
    if file.name == "vocab.txt":
        settings = {"do_lower_case": is_lower_case(source, read_vocab(file)), **settings}
    else:  # transformers reads these to build the same tokenizer (and needs them to)
        settings = {"tokenizer_class": "RobertaTokenizer", "add_prefix_space": False, **settings,
                    "mask_token": {"__type": "AddedToken", "content": BYTE_LEVEL_BPE.mask,
                                   "lstrip": True, "rstrip": False, "normalized": False,
                                   "single_word": False, "special": True}}
    for name in ("vocab.txt",) if file.name == "vocab.txt" else ("vocab.json", "merges.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    (tmp / "tokenizer_config.json").write_text(json.dumps(settings) + "\n")


def _contiguous_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (the q/k/v chunks of one qkv matrix).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_pretrained(model: BertForMaskedLM, dst: str | Path, tokenizer_source: Path | None = None,
                    overwrite: bool = False) -> Path:
    """Write `model` as a minibert checkpoint folder; vocab files come from tokenizer_source."""
    with atomic_folder(dst, overwrite) as tmp:
        config = {"model_type": "minibert", **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(_contiguous_copies(model.state_dict()), tmp / "model.safetensors",
                  metadata={"format": "pt"})
        _tokenizer_files(tokenizer_source, tmp)
    return Path(dst)


def save_huggingface(model: BertForMaskedLM, dst: str | Path, tokenizer_source: Path | None = None,
                     overwrite: bool = False) -> Path:
    """Write `model` in the HuggingFace layout of its family's masked-LM class
    (BertForMaskedLM, RobertaForMaskedLM, ...: what transformers loads)."""
    with atomic_folder(dst, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
        save_file(_contiguous_copies(minibert_to_hf(model.state_dict(), model.config.family)),
                  tmp / "model.safetensors", metadata={"format": "pt"})
        _tokenizer_files(tokenizer_source, tmp)
    return Path(dst)
