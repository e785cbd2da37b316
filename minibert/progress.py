"""Progress for a person at a terminal, whole lines for a log.

A tqdm bar redraws one line with carriage returns. On a terminal that line moves in place; in a
file or a pipe (`train.py > log 2>&1`, `| tee log`, a cluster's job log) every redraw stays, and
a line printed meanwhile, such as an evaluation's result, is appended to the bar's last redraw,
where `grep '^step'` no longer finds it. So minibert draws bars only for a person watching:
when both stdout and stderr are terminals (its lines go to the one, its bars to the other, and
only on a terminal do the two share a screen without mixing), or in a Jupyter notebook, whose
bars are widgets. Anywhere else the same progress is written as whole lines, flushed at once,
so that `tail -f` and `grep` see them as they come:

    training    one line per log step on stdout, beside the evaluation lines: step, train
                loss, learning rate, tokens/s (minibert/training_log.py)
    tokenizing  a line on stderr when a split's build starts, and one when it ends
                (minibert/data.py)
    hashing     nothing: it is short, and the tokenizing line follows

A library function does not read the environment, but where its output goes is the process's
own state, the same thing tqdm looks at to size its bar: interactive() reads it at the moment
of asking.
"""

from __future__ import annotations

import sys

import tqdm.autonotebook
import tqdm.std


def interactive() -> bool:
    """Whether a person watches the output live, so that bars are readable: stdout and stderr
    are both terminals, or this is a Jupyter notebook (where tqdm.auto draws widgets)."""
    in_notebook = tqdm.autonotebook.tqdm is not tqdm.std.tqdm  # its choice between the two
    return in_notebook or all(_is_terminal(stream) for stream in (sys.stdout, sys.stderr))


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a stand-in without isatty, or a closed file
        return False


def say(text: str) -> None:
    """Print one whole line on stderr and flush it, so that a log that is a file or a pipe gets
    it now, in order with what went to stdout."""
    print(text, file=sys.stderr, flush=True)
