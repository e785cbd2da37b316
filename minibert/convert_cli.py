"""Convert HuggingFace checkpoints of the BERT family to minibert, and minibert ones back.

    python convert_weights.py bert-base-uncased out/bert-base          # hub id (needs network)
    python convert_weights.py ../shared/assets/checkpoints/bert-tiny-splade-mlm out/bert-tiny
    python convert_weights.py out/bert-tiny out/bert-tiny-hf --to-hf     # back to transformers

SRC may be a HuggingFace folder (BERT, RoBERTa, DistilBERT or ELECTRA: the encoder alone, with
its masked-LM head, or its pre-training class; model.safetensors or pytorch_model.bin) or a
minibert folder; DST is written atomically. --to-hf writes the family's masked-LM class
(BertForMaskedLM, RobertaForMaskedLM, DistilBertForMaskedLM, ElectraForMaskedLM).
--overwrite replaces an existing DST only if it is a checkpoint folder: config.json, weights
and tokenizer files, nothing else (minibert/checkpoint.py); anything else is refused.
Installed with pip, `minibert-convert SRC DST [--to-hf]` is the same command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_checkpoint, save_huggingface, save_pretrained
from .cli import ArgumentParser
from .convert import FAMILIES
from .errors import run_main


@dataclass
class ConvertArgs:
    src: str  # checkpoint folder or hub id to read
    dst: Path  # folder to write; must not exist unless overwrite
    to_hf: bool = False  # write the family's HuggingFace masked-LM layout, not minibert's
    overwrite: bool = False  # replace dst if it is a checkpoint folder (checkpoint.py says which)


def parse_args(argv: list[str] | None = None) -> ConvertArgs:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="HuggingFace or minibert checkpoint folder, or a hub id")
    parser.add_argument("dst", type=Path, help="output folder (written atomically)")
    parser.add_argument("--to-hf", action="store_true",
                        help="write the HuggingFace layout of the model's family "
                             "(BertForMaskedLM, RobertaForMaskedLM, ...) for transformers")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is a checkpoint folder (config.json, weights, "
                             "tokenizer files; nothing else)")
    return ConvertArgs(**vars(parser.parse_args(argv)))


def convert(args: ConvertArgs) -> None:
    model, folder, notices = read_checkpoint(args.src)
    for notice in notices:
        print(f"note: {notice}")
    save = save_huggingface if args.to_hf else save_pretrained
    save(model, args.dst, tokenizer_source=folder, overwrite=args.overwrite)
    params = sum(p.numel() for p in model.parameters())
    layout = (f"HuggingFace {FAMILIES[model.config.family].masked_lm}" if args.to_hf
              else "minibert")
    print(f"wrote {args.dst} ({layout}, {params / 1e6:.1f} M parameters, "
          f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size})")


def main(argv: list[str] | None = None) -> None:
    """Entry point of convert_weights.py, `python -m minibert.convert_cli` and the
    minibert-convert command."""
    run_main(lambda: convert(parse_args(argv)))


if __name__ == "__main__":
    main()
