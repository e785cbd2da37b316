"""Stopping a run on SIGTERM or Ctrl-C: the first signal asks for a checkpoint and a clean stop
at the next step boundary, a second one stops at once.

    with StopRequest() as stop:
        while step < total_steps:
            if stop.requested:      # the trainer agrees on this across ranks (CountAndVote)
                break
            ...

Job schedulers, `docker stop` and torchrun send SIGTERM (torchrun forwards Ctrl-C as SIGINT),
then SIGKILL some seconds later: the first signal must leave time to save, the second must not
be ignored. The trainer turns the recorded signal into the exit status 128 + signum.
"""

from __future__ import annotations

import signal
import threading

from .distributed import print0
from .errors import StopNow


class StopRequest:
    """SIGTERM or Ctrl-C. The first sets `requested`: the loop saves a checkpoint at the next
    step boundary and stops. A second stops at once, wherever the run is (in an evaluation, in
    a save): the handler raises StopNow, and the writes in progress delete their temporaries on
    the way out; from then on the signals have their default effect, so a third one ends the
    process even inside a collective that never returns.

    torchrun starts its workers in a session of their own: Ctrl-C in the terminal reaches
    torchrun, which sends each worker one SIGINT (SIGTERM when it got SIGTERM), waits 30 s, then
    sends SIGKILL. Handlers can only be installed from the main thread; elsewhere this does
    nothing.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the signal that asked for the stop
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested:
            for other in self._previous:
                signal.signal(other, signal.SIG_DFL)
            raise StopNow(signum)
        self.requested, self.signum = True, signum
        print0(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then "
               f"stopping (a second one stops at once, without saving)")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
