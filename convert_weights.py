"""Convert HuggingFace BERT checkpoints to minibert, and minibert checkpoints back.

    python convert_weights.py bert-base-uncased out/bert-base          # hub id (needs network)
    python convert_weights.py ../shared/assets/checkpoints/bert-tiny-splade-mlm out/bert-tiny
    python convert_weights.py out/bert-tiny out/bert-tiny-hf --to-hf     # back to transformers

The command is minibert/convert_cli.py (`--help` says what SRC may be), so that the installed
`minibert-convert` runs the same code; this file is its entry point in a clone of the repository.
"""

from minibert.convert_cli import ConvertArgs, convert, main, parse_args  # noqa: F401 (importable here)

if __name__ == "__main__":
    main()
