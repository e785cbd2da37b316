"""The one exception type that minibert raises for bad input, and how scripts report it.

Library code raises MinibertError with a message that names the file and the problem; only
the entry points (train.py, convert_weights.py, `python -m minibert.fill_mask`) turn it into
a one-line error and a non-zero exit status. Exit statuses: 0 done, 1 bad input or failure,
130 / 143 stopped by SIGINT / SIGTERM (after saving what can be resumed, for training).
"""

from __future__ import annotations

import signal
import sys
from typing import Callable, NoReturn


class MinibertError(Exception):
    """Bad input that the user can fix: a missing file, a corrupt checkpoint, an empty corpus."""


class StopNow(KeyboardInterrupt):
    """A second SIGINT or SIGTERM during training: stop at once, without saving. Raised from the
    signal handler wherever the run is; the writes in progress delete their temporaries on the
    way out. A KeyboardInterrupt, so that code that lets Ctrl-C through lets this through too."""

    def __init__(self, signum: int):
        super().__init__(f"a second {signal.Signals(signum).name}: stopped at once, without "
                         f"saving (the checkpoints already written are intact)")
        self.signum = signum


def signal_exit_status(signum: int) -> int:
    """128 + the signal's number (130 for SIGINT, 143 for SIGTERM): the status a shell reports
    for a process that a signal ended, so that `train.py && next` does not go on."""
    return 128 + signum


def run_main(main: Callable[[], int | None],
             exit_with: Callable[[int], NoReturn] = sys.exit) -> NoReturn:
    """Call main() and exit with the status it returns (None: 0). A MinibertError becomes
    'error: <message>' and status 1; Ctrl-C (and StopNow) status 128 + the signal's number.
    `exit_with` ends the process with that status (train.py: distributed.exit_process)."""
    try:
        status = main() or 0
    except MinibertError as error:
        print(f"error: {error}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt as error:
        print(f"interrupted: {error}" if str(error) else "interrupted", file=sys.stderr)
        status = signal_exit_status(getattr(error, "signum", signal.SIGINT))
    exit_with(status)
