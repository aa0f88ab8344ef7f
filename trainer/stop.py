"""Stopping a run at a step boundary every rank agrees on: preemption, SIGTERM, Ctrl-C.

A stop source says why this rank should stop (:data:`PREEMPT`, :data:`STOP`, or 0
for no reason). After every optimiser step the loop combines the ranks' answers
in one 1-element all-reduce (MAX; only when the job has a stop source, and
skipped on a world of one), so all ranks stop after the same step, write one
checkpoint there and return :class:`condmoe.trainer.loop.TrainResult` with
``stopped`` set. A rank that got a signal mid-step simply finishes the step.

:class:`SignalStop` is the source without Ray: SIGTERM (and SIGINT when asked)
sets its flag; a second signal runs the previous handler (exit now). From the
first request it gives the run ``grace_s`` seconds to commit the checkpoint;
past that it ends the process (``os._exit``), so a checkpoint that cannot finish
in time is never committed and the previous one stays the latest (the atomic
layout of condmoe.trainer.checkpoint never chooses a half-written one).
condmoe.cluster.preempt adds Ray's node-drain notice and the driver's stop
request as further reasons.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPT = 1  # this worker's node is going away: checkpoint, stop, and let the job restart where it can
STOP = 2     # the job is ending (condmoe train got SIGTERM / Ctrl-C): checkpoint and stop for good
REASONS = {PREEMPT: "preempt", STOP: "stop"}
EXIT_GRACE = 75  # exit status when the grace period ran out before the checkpoint was committed


class StopSource(Protocol):
    """What the loop asks after each step (condmoe.cluster.preempt and :class:`SignalStop` fit)."""

    def poll(self) -> int: ...   # 0, PREEMPT or STOP: this rank's reason to stop now
    def done(self) -> None: ...  # the stop checkpoint is committed: no deadline any more


def agree(code: int) -> int:
    """The stop code all ranks act on: the largest of theirs (one 1-element all-reduce; a collective,
    so every rank calls it after every step). A world of one needs no collective."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return code
    t = torch.tensor([code], dtype=torch.int32)  # on CPU: gloo, also beside nccl (cpu:gloo,cuda:nccl)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class SignalStop:
    """This process' reasons to stop, with a deadline: signals, and :meth:`request` from other sources.

    ``install()`` (main thread only) makes it the handler of ``signals``; the training thread
    reads :meth:`poll`. ``on_expire`` runs when ``grace_s`` passed since the first request without
    :meth:`done` (default: ``os._exit(EXIT_GRACE)``). While ``armed`` is False (no run in progress:
    a Ray worker before and after its training function) a signal goes straight to the previous handler.
    """

    def __init__(self, grace_s: float, *, code: int = PREEMPT, signals: tuple[int, ...] = (signal.SIGTERM,),
                 on_expire: Callable[[], None] | None = None) -> None:
        if grace_s <= 0:
            raise ValueError(f"grace_s must be > 0, got {grace_s}")
        self.grace_s, self.code, self.signals = grace_s, code, signals
        self.on_expire = on_expire or _exit_after_grace
        self.reason = 0
        self.why = ""
        self._signalled = False
        self.armed = True
        self.requested_at: float | None = None
        self._previous: dict[int, object] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def install(self) -> "SignalStop":
        """Handle ``signals`` from now on (call from the main thread); returns self."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) is self:
                signal.signal(sig, previous)
        self._previous.clear()
        self.done()

    def __call__(self, signum: int, frame) -> None:
        """The signal handler: the first signal requests a stop; the next one runs the previous handler."""
        if self._signalled or not self.armed:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            else:  # SIG_DFL / SIG_IGN: the default action of a second signal is to end the process
                os._exit(128 + signum)
            return
        self._signalled = True
        self.request(self.code, signal.Signals(signum).name)

    def request(self, code: int, why: str) -> None:
        """Ask for a stop (``code`` PREEMPT or STOP, ``why`` for the log); starts the grace timer once."""
        with self._lock:
            first = self.requested_at is None
            self.reason, self.why = max(self.reason, code), why if first else self.why
            if not first:
                return
            self.requested_at = time.time()
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        log.warning("%s: checkpoint at the next step boundary, then stop (%.0f s grace)", why, self.grace_s)

    def poll(self) -> int:
        return self.reason

    def done(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _expire(self) -> None:
        log.error("%s: no checkpoint committed within %.0f s; stopping without one (the previous checkpoint "
                  "stays the latest)", self.why, self.grace_s)
        self.on_expire()


def _exit_after_grace() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_GRACE)
