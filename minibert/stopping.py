"""Stopping a run on SIGTERM or Ctrl-C: the first signal asks for a checkpoint and a clean stop
at the next step boundary, a second one stops at once. And stopping a run that has diverged,
before it saves a model that is not finite (`divergence`).

    with StopRequest() as stop:
        while step < total_steps:
            if stop.requested:      # the trainer agrees on this across ranks (CountAndVote)
                break
            ...

Job schedulers, `docker stop` and torchrun send SIGTERM (torchrun forwards Ctrl-C as SIGINT),
then SIGKILL some seconds later: the first signal must leave time to save, the second must not
be ignored. The trainer turns the recorded signal into the exit status 128 + signum.

A process blocked inside a collective (an all-reduce waiting for a rank that will never join)
runs no Python code, so no Python handler sees either signal. A watchdog thread learns of
every signal from the interpreter's wakeup file descriptor (signal.set_wakeup_fd: written by
the C-level handler at once, whatever the main thread is doing); FORCED_EXIT_AFTER_S seconds
after the second signal, unless the run has left the `with` block by then, it ends the process
with os._exit(128 + signum). torchrun kills its workers itself 30 s after its signal; a plain
multi-process launch has no one else to do it.
"""

from __future__ import annotations

import math
import os
import signal
import threading

import torch

from .distributed import print0
from .errors import StopNow


class StopRequest:
    """SIGTERM or Ctrl-C. The first sets `requested`: the loop saves a checkpoint at the next
    step boundary and stops. A second stops at once, wherever the run is (in an evaluation, in
    a save): the handler raises StopNow, and the writes in progress delete their temporaries on
    the way out; from then on the signals have their default effect. Where the handler cannot
    run (inside a collective that never returns), the watchdog ends the process
    FORCED_EXIT_AFTER_S seconds after the second signal.

    torchrun starts its workers in a session of their own: Ctrl-C in the terminal reaches
    torchrun, which sends each worker one SIGINT (SIGTERM when it got SIGTERM), waits 30 s, then
    sends SIGKILL. Handlers can only be installed from the main thread; elsewhere this does
    nothing.
    """

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the signal that asked for the stop
        self._previous: dict[int, object] = {}
        self._watchdog: _Watchdog | None = None

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
            self._watchdog = _Watchdog()
        return self

    def __exit__(self, *exc) -> None:
        if self._watchdog is not None:
            self._watchdog.close()  # the main thread got here: it is not stuck
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# After the second signal a responsive run is gone within a second (StopNow, temporaries
# deleted); one stuck in a collective is not, ever. A few seconds tell the two apart.
FORCED_EXIT_AFTER_S = 3.0


class _Watchdog:
    """A thread that reads the signal numbers the interpreter writes to its wakeup file
    descriptor and, FORCED_EXIT_AFTER_S after the second SIGINT or SIGTERM, ends the process
    with 128 + that signal unless close() was called first."""

    def __init__(self):
        self._read, write = os.pipe()
        os.set_blocking(write, False)  # the interpreter requires it: a handler never blocks
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name="minibert-stop-watchdog", daemon=True).start()

    def _watch(self) -> None:
        count = 0
        try:
            while not self._closed.is_set():
                received = os.read(self._read, 64)
                if not received:  # close(): the write end is closed
                    return
                for signum in received:
                    if signum in (signal.SIGINT, signal.SIGTERM):
                        count += 1
                        if count == 2:
                            if not self._closed.wait(FORCED_EXIT_AFTER_S):
                                os.write(2, f"a second {signal.Signals(signum).name} and the "
                                            f"process did not stop within "
                                            f"{FORCED_EXIT_AFTER_S:g} s (stuck in a "
                                            f"collective?): exiting now\n".encode())
                                os._exit(128 + signum)
                            return
        finally:
            os.close(self._read)

    def close(self) -> None:
        """Stop watching and give the wakeup file descriptor back."""
        self._closed.set()
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # the thread's read ends


# Below a loss scale of 1 the GradScaler no longer protects small fp16 gradients from
# underflow: it shrinks the loss because the gradients overflow fp16 (max 65504) at their true
# size, and it skips every such step. From its initial 2**16 that takes 17 more overflows than
# growths (one growth per 2000 clean steps): the run has stopped learning.
MIN_LOSS_SCALE = 1.0


def divergence(precision: str, scaler: torch.amp.GradScaler, log,
               record: dict | None) -> str | None:
    """What shows that a run has diverged, or None. fp32 and bf16: a loss or gradient norm that
    is not finite, read from a log line's `record`, or, before a save (record None), from the
    sums over the steps since the last line (log.window_is_finite, a TrainingLog: the host
    waits for the device there, as a save makes it wait anyway). fp16: the GradScaler skips
    such steps itself, halving its scale each time; a scale below MIN_LOSS_SCALE shows that
    every step overflows."""
    if precision == "fp16":
        scale = record["loss_scale"] if record is not None else scaler.get_scale()
        return (f"the fp16 loss scale has collapsed to {scale:g} (every step overflows and is "
                f"skipped)" if scale < MIN_LOSS_SCALE else None)
    if record is not None:
        bad = [f"{name.replace('_', ' ')} is {record[name]}"
               for name in ("train_loss", "grad_norm") if not math.isfinite(record[name])]
        return f"the {' and the '.join(bad)}" if bad else None
    return None if log.window_is_finite() else ("a loss or gradient norm since the last log "
                                                 "line is not finite")
