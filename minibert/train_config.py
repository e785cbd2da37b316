"""What a training run is asked to do: one typed dataclass, filled from three layers.

    defaults (the dataclass below)  <  a TOML file (--config FILE)  <  --key value flags

    cfg = parse_config(["--config", "configs/quickstart-cpu.toml", "--lr", "3e-4"])

Every field has a comment; argparse shows them in `python train.py --help`. Values are
checked in `TrainConfig.__post_init__`, so a bad one stops the run before any work with a
one-line MinibertError. Relative paths are relative to the directory the run starts in
(the repository root for the shipped configs).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import io
import math
import re
import tokenize
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: tomli, the package tomllib was made from (same API)
    import tomli as tomllib

from .cli import ArgumentParser
from .distributed import BACKENDS
from .errors import MinibertError
from .evaluate import check_settings
from .model import BertConfig

INITS = ("pretrained", "random")


@dataclass
class TrainConfig:
    """Masked-LM training of BERT on a text corpus: fine-tuning a checkpoint (init
    "pretrained") or pretraining from scratch (init "random")."""

    # what to train, on what, where to write
    model: str = "bert-base-uncased"  # checkpoint folder (minibert or HuggingFace) or hub id
    data: str = "wikitext-2-raw-v1"  # hub dataset name, or a folder with train/valid text files
    out_dir: str = "runs/minibert"  # metrics.jsonl, loss.png, checkpoints/ and final/ go here
    cache_dir: str = "~/.cache/minibert"  # where tokenized blocks are cached, keyed by content
    join_wikitext_artifacts: bool = True  # turn WikiText's " @-@ " back into "-" (and @,@ @.@)
    max_seq_length: int = 512  # tokens per training block, [CLS] and [SEP] included
    init: str = "pretrained"  # pretrained|random; random: BERT's init from seed, no weights read
    model_config: dict | None = None  # BertConfig fields over model's config.json (init random)

    # batch and length of training
    batch_size: int = 8  # sequences per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step on each process
    epochs: int = 3  # passes over the training blocks (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps to train; overrides epochs when set

    # optimizer and schedule
    lr: float = 5e-5  # peak learning rate of AdamW
    warmup_steps: int | None = None  # steps of linear warmup (None: warmup_ratio of all steps)
    warmup_ratio: float = 0.06  # fraction of the steps spent warming up, when warmup_steps unset
    weight_decay: float = 0.01  # AdamW decoupled weight decay (never on biases or LayerNorm)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-6  # AdamW epsilon (BERT used 1e-6)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)

    # numerics and regularisation
    precision: str = "auto"  # auto|fp32|fp16|bf16; auto: native bf16, else fp16 (GPU), fp32 (CPU)
    device: str = "auto"  # auto|cpu|cuda; auto: cuda when a GPU is visible
    dropout: float | None = None  # override hidden and attention dropout (None: the model's)
    compile: bool = False  # torch.compile the training model: faster GPU steps after compiling
    dist_backend: str = "auto"  # auto|nccl|gloo between processes; auto: nccl on GPUs, else gloo
    mlm_probability: float = 0.15  # fraction of each block's tokens that are prediction targets
    whole_word_mask: bool = False  # mask whole words, never part of one (training and evaluation)
    seed: int = 0  # seeds data order, training masks, dropout and new weights (init, MLM head)
    eval_seed: int = 0  # seeds the fixed evaluation masks (same value: comparable runs)

    # logging, evaluation, checkpoints
    log_every: int = 10  # write a metrics line every this many steps
    eval_every: int = 200  # evaluate every this many steps (0: only before and after)
    eval_max_blocks: int | None = None  # evaluate on the first N validation blocks only
    eval_batch_size: int | None = None  # sequences per evaluation batch (None: batch_size)
    save_every: int = 500  # write checkpoints/step-N every this many steps (0: only at the end)
    keep_last: int = 2  # keep only the newest N step checkpoints (0: keep all)
    resume: str | None = None  # "latest" (newest in out_dir/checkpoints) or a step-N folder
    overwrite: bool = False  # start afresh in an out_dir with checkpoints (deletes those only)
    peak_tflops: float | None = None  # per-device peak for MFU (None: looked up for known GPUs)

    def __post_init__(self) -> None:
        for f in fields(self):  # inf and nan pass a range check such as lr > 0, or fail it oddly
            value = getattr(self, f.name)
            _check(not isinstance(value, float) or math.isfinite(value), f.name,
                   f"must be a finite number, got {value}")
        try:  # the settings an evaluation shares with the evaluate command: its rules
            check_settings(max_seq_length=self.max_seq_length, eval_seed=self.eval_seed,
                           mlm_probability=self.mlm_probability, precision=self.precision,
                           device=self.device)
        except MinibertError as error:
            raise MinibertError(f"config: {error}") from None
        for name in ("batch_size", "grad_accum", "epochs", "log_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("max_steps", "eval_max_blocks", "eval_batch_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, "must be >= 1")
        for name in ("eval_every", "save_every", "keep_last", "seed"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0.0 <= self.adam_beta1 < 1.0, "adam_beta1", "must be in [0, 1)")
        _check(0.0 <= self.adam_beta2 < 1.0, "adam_beta2", "must be in [0, 1)")
        _check(self.adam_eps > 0, "adam_eps", "must be > 0")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 turns clipping off)")
        _check(self.dist_backend in BACKENDS, "dist_backend",
               f"must be one of {'|'.join(BACKENDS)}")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be > 0")
        for name in ("model", "data", "out_dir", "cache_dir"):
            _check(getattr(self, name) != "", name, "must not be empty")
        _check(self.init in INITS, "init", f"must be one of {'|'.join(INITS)}")
        if self.model_config is not None:
            # A checkpoint's weights fix its shape: reshaping needs weights drawn afresh.
            _check(self.init == "random", "model_config", 'reshapes the model, so it needs '
                   'init = "random" (to change a pretrained model\'s dropout, set dropout)')
            _check_model_config(self.model_config)


def _check(ok: bool, name: str, requirement: str) -> None:
    if not ok:
        raise MinibertError(f"config: {name} {requirement}")


def _check_model_config(overrides: dict) -> None:
    """Every key of [model_config] is a BertConfig field and every value has its type. (Ranges
    and combinations, such as hidden_size divisible by the heads, are checked when the model's
    config.json and these overrides are combined: BertConfig.__post_init__.)"""
    hints = typing.get_type_hints(BertConfig)
    for key, value in overrides.items():
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            if key in {f.name for f in fields(TrainConfig)}:
                hint = f" ({key} is a training setting: put it above the [model_config] table)"
            raise MinibertError(f"config: model_config: unknown BertConfig field {key}{hint}")
        kind = hints[key]
        if isinstance(kind, types.UnionType):  # embedding_size: int | None; TOML has no None
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        _check(ok, f"model_config: {key}", f"must be {kind.__name__}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Reading values from TOML and from the command line


def _field_comments(cls: type) -> dict[str, str]:
    """{field: its trailing comment} read from the class source, used as --help text, so the
    comment in the dataclass is the one place a field is documented."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            match = re.match(r"\s*(\w+)\s*:", token.line)
            if match:
                comments[match.group(1)] = token.string.lstrip("# ").strip()
    return comments


def _base_type(name: str) -> tuple[type, bool]:
    """The type of field `name` and whether it may be None: 'int | None' -> (int, True)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return hint, False


def _convert(name: str, value: Any, origin: str) -> Any:
    """Check and convert one value (a TOML value or a command-line string) to the field's type."""
    kind, optional = _base_type(name)
    from_text = isinstance(value, str) and origin == "command line"
    if name == "resume":  # true/false in TOML, a bare --resume, or a path
        if value is True or (from_text and value.lower() in ("true", "latest")):
            return "latest"
        if value is False or (from_text and value.lower() in ("false", "none", "")):
            return None
    if optional and (value is None or (from_text and value.lower() in ("none", "null"))):
        return None
    if name == "model_config" and from_text:  # a TOML inline table, as in a config file
        try:
            table = tomllib.loads(f"model_config = {value}")["model_config"]
        except tomllib.TOMLDecodeError:
            table = None
        if not isinstance(table, dict):
            raise MinibertError(f"{origin}: model_config must be a TOML inline table such as "
                                f"'{{num_hidden_layers = 4, hidden_size = 256}}', got {value!r}")
        return table
    if from_text and kind is not str:
        if kind is bool:
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        else:
            try:
                return kind(value)
            except ValueError:
                pass
        raise MinibertError(f"{origin}: {name} must be {kind.__name__}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MinibertError(f"{origin}: {name} must be {kind.__name__}, got {value!r}")
    return value


def _unknown_key(key: str, origin: str) -> MinibertError:
    names = [f.name for f in fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return MinibertError(f"{origin}: unknown setting {key}{hint}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML config file, checked against TrainConfig's fields and types."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinibertError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MinibertError(f"{path}: cannot read ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise MinibertError(f"{path}: not valid TOML ({error})") from None
    names = {f.name for f in fields(TrainConfig)}
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(key, str(path))
        values[key] = _convert(key, value, str(path))
    return values


class _Parser(ArgumentParser):
    """minibert's parser (both spellings: --batch_size and --batch-size; one-line errors),
    calling an unknown flag a setting, as an unknown key of the TOML file is one."""

    unknown_noun = "setting"


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """--config FILE plus one --field flag per TrainConfig field (defaults shown in --help)."""
    parser = _Parser(description=description)
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings; flags override it")
    comments = _field_comments(TrainConfig)
    for f in fields(TrainConfig):
        kind, _ = _base_type(f.name)
        default = f.default if f.default is not MISSING else None
        help_text = f"{comments.get(f.name, '')} [default: {default}]"
        # Every flag takes its value as text (converted by _convert). Bare boolean flags and a
        # bare --resume mean "true"; every flag accepts "none" when the field may be None.
        bare = "true" if kind is bool or f.name == "resume" else None
        parser.add_argument(f"--{f.name}", dest=f.name, metavar=kind.__name__.upper(),
                            nargs="?" if bare else None, const=bare,
                            default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_config(argv: list[str], description: str | None = None) -> TrainConfig:
    """TrainConfig from command-line arguments: defaults < --config FILE < --key value."""
    flags = vars(build_parser(description).parse_args(argv))
    values = read_toml(flags.pop("config")) if flags.get("config") else {}
    flags.pop("config", None)
    for key, text in flags.items():
        values[key] = _convert(key, text, "command line")
    return TrainConfig(**values)
