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

What --overwrite (overwrite=True) replaces: a checkpoint folder, and nothing else. A checkpoint
folder, for this purpose, holds config.json and a weight file (WEIGHT_FILES) and besides them
only tokenizer files (vocab.txt, tokenizer_config.json, and HuggingFace's vocab.json,
merges.txt, tokenizer.json, special_tokens_map.json, added_tokens.json): plain files, no
subfolder, nothing else (CHECKPOINT_FILES). A folder with anything more, a README or a note or
a subfolder, is the user's and is refused in one line, as a file is; an empty folder holds
nothing to lose and is replaced. The path is resolved first (symlinks, "..") and never
replaced when it is /, the home folder, the current folder or one that holds it, or a folder
that holds the source being converted (check_overwrite). train.py's final/ is a minibert
checkpoint folder, so a finished run replaces it; the resume checkpoints step-N hold model/
(a checkpoint folder) and training_state.pt, and their writer checks that in the same way
(minibert/train_state.py).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .convert import (check_family, config_from_hf, config_to_hf, hf_to_minibert,
                      minibert_to_hf)
from .errors import MinibertError
from .model import BertConfig, BertForMaskedLM
from .safe_write import atomic_folder, readable
from .tokenizer import (BYTE_LEVEL_BPE, is_lower_case, load_tokenizer, read_vocab,
                        tokenizer_family, tokenizer_settings, vocab_file)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json")
# What a checkpoint folder may hold, and so what --overwrite may delete (the module docstring).
CHECKPOINT_FILES = frozenset({"config.json", *WEIGHT_FILES, *TOKENIZER_FILES, "tokenizer.json",
                              "special_tokens_map.json", "added_tokens.json"})
# roberta-base's shape (its config.json), for init = "random" from a BPE vocabulary alone.
ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
                "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve(source: str | Path, weights: bool = True) -> Path:
    """A local folder, or a hub id such as bert-base-uncased downloaded into the HF cache
    (without its weight files when `weights` is False). Reading never writes: a folder whose
    replacement a kill interrupted is read from the complete side of the swap, which stays
    where it is (safe_write.readable; `swap_notice` says so)."""
    folder = readable(source)
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


def swap_notice(source: str | Path, folder: Path) -> list[str]:
    """One line when `folder`, read for `source`, is the complete side of an interrupted
    replacement of it (resolve), else none."""
    source = Path(source)
    if folder == source or folder.parent != source.parent:  # the folder itself, or a hub id's
        return []
    return [f"{source}: its replacement was interrupted; read the complete {folder.name} "
            f"beside it (the next write there finishes the replacement)"]


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
    notices = swap_notice(source, folder)
    weights = _read_weights(folder)
    if raw_config.get("model_type") == "minibert":
        state = weights
    else:
        state, conversion_notices = hf_to_minibert(weights, config.family)
        notices += conversion_notices
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
    if (file := vocab_file(folder)) is not None:
        check_vocabulary(config, load_tokenizer(folder), file)
    model.load_state_dict(state)
    return model.eval(), folder, notices


def random_init(source: str | Path, *, seed: int, overrides: dict | None = None,
                ) -> tuple[BertForMaskedLM, Path, list[str]]:
    """A model to pretrain from scratch: the shape from the config.json of `source` with
    `overrides` (BertConfig fields) applied, weights from `init_model(config, seed)`. Only
    config.json and the vocabulary are read: a folder without weights is fine, and a folder
    with a vocabulary alone starts from bert-base's shape (BertConfig's defaults), or
    roberta-base's for a byte-level BPE vocabulary (vocab.json).
    Returns (model in eval mode, the folder read, notices worth telling the user)."""
    folder = resolve(source, weights=False)
    notices = swap_notice(source, folder)
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
    check_vocabulary(config, load_tokenizer(folder), file)
    return init_model(config, seed), folder, notices


def check_vocabulary(config: BertConfig, tokenizer: Tokenizer, vocabulary: Path) -> None:
    """Refuse, in one line, a config that does not fit the tokenizer built from `vocabulary`:
    vocab_size must be its number of tokens (the word embedding has a row per token), and
    pad_token_id the id of its padding token, whose embedding row starts at zero and gets no
    gradient: a wrong id would freeze a real token's row and train the padding's. The padding
    token's id comes from the tokenizer, so a tokenizer whose padding token is spelled
    differently is checked by these same lines once the lookup below knows its name."""
    tokens = tokenizer.get_vocab_size()
    if tokens != config.vocab_size:
        raise MinibertError(f"vocab_size {config.vocab_size} does not match {vocabulary} "
                            f"({tokens} tokens): the word embedding has a row per token")
    pad_token = tokenizer_family(tokenizer).pad  # [PAD], or RoBERTa's <pad>
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id != config.pad_token_id:
        raise MinibertError(f"pad_token_id {config.pad_token_id} does not match {vocabulary}, "
                            f"where {pad_token} is {pad_id}: the padding token's embedding row "
                            f"is the one kept at zero")


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


def not_a_checkpoint(folder: Path) -> str | None:
    """What makes `folder` other than a checkpoint folder: "notes.txt", "sub/", "no config.json",
    "no weights"; None for a checkpoint folder, or an empty one."""
    entries = sorted(folder.iterdir())
    for entry in entries:
        if entry.is_dir():
            return f"{entry.name}/"
        if entry.name not in CHECKPOINT_FILES or not entry.is_file():
            return entry.name
    found = {entry.name for entry in entries}
    if entries and "config.json" not in found:
        return "no config.json"
    if entries and not found & set(WEIGHT_FILES):
        return "no weights"
    return None


def check_overwrite(dst: str | Path, source: Path | None = None) -> Path:
    """`dst` resolved, once it is sure that replacing it loses nothing but a checkpoint (the
    module docstring says what that is); else MinibertError in one line. `source`: the folder
    being converted, whose parents are never replaced."""
    target = Path(dst).expanduser().resolve()
    if target == target.parent:
        raise MinibertError(f"{dst}: --overwrite never replaces /")
    if target == Path.cwd().resolve() or Path.cwd().resolve().is_relative_to(target):
        raise MinibertError(f"{dst}: --overwrite never replaces the current folder or a folder "
                            f"that holds it ({target})")
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home folder known
        home = None
    if target == home:
        raise MinibertError(f"{dst}: --overwrite never replaces the home folder")
    if source is not None and source.resolve() != target and source.resolve().is_relative_to(target):
        raise MinibertError(f"{dst}: --overwrite never replaces a folder that holds the source "
                            f"{source}")
    if target.exists() and not target.is_dir():
        raise MinibertError(f"{dst}: not a folder; --overwrite replaces only a checkpoint folder")
    problem = not_a_checkpoint(target) if target.is_dir() else None
    if problem is not None:
        raise MinibertError(f"{dst}: --overwrite replaces only a checkpoint folder (config.json, "
                            f"weights, tokenizer files), and this one holds {problem}; move it "
                            f"or choose another folder")
    return target


def _contiguous_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (the q/k/v chunks of one qkv matrix).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_pretrained(model: BertForMaskedLM, dst: str | Path, tokenizer_source: Path | None = None,
                    overwrite: bool = False) -> Path:
    """Write `model` as a minibert checkpoint folder; vocab files come from tokenizer_source.
    With overwrite, an existing dst is replaced only if it is a checkpoint (check_overwrite)."""
    with atomic_folder(check_overwrite(dst, tokenizer_source) if overwrite else dst,
                       overwrite) as tmp:
        config = {"model_type": "minibert", **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(_contiguous_copies(model.state_dict()), tmp / "model.safetensors",
                  metadata={"format": "pt"})
        _tokenizer_files(tokenizer_source, tmp)
    return Path(dst)


def save_huggingface(model: BertForMaskedLM, dst: str | Path, tokenizer_source: Path | None = None,
                     overwrite: bool = False) -> Path:
    """Write `model` in the HuggingFace layout of its family's masked-LM class
    (BertForMaskedLM, RobertaForMaskedLM, ...: what transformers loads). With overwrite, an
    existing dst is replaced only if it is a checkpoint (check_overwrite)."""
    with atomic_folder(check_overwrite(dst, tokenizer_source) if overwrite else dst,
                       overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
        save_file(_contiguous_copies(minibert_to_hf(model.state_dict(), model.config.family)),
                  tmp / "model.safetensors", metadata={"format": "pt"})
        _tokenizer_files(tokenizer_source, tmp)
    return Path(dst)
