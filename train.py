"""Fine-tune a BERT checkpoint with masked-LM on a text corpus, on CPU, one GPU or many.

    python train.py --config configs/quickstart-cpu.toml                 # CPU, offline
    torchrun --nproc_per_node=2 train.py --config configs/bert-base-wikitext2-2xT4.toml

`python train.py --help` shows the commands (one process, torchrun on one or several machines,
resume) and every setting. The command is minibert/train_cli.py, so that the installed
`minibert-train` runs the same code; this file is its entry point in a clone of the repository.
"""

from minibert.train_cli import main

if __name__ == "__main__":
    main()
