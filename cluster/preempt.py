"""Preemption and stopping under Ray: the sources of condmoe.trainer.stop, on workers and on the driver.

A training worker stops at the next step boundary (all ranks agree in the loop's
1-element all-reduce, condmoe.trainer.stop) when

- its process gets SIGTERM: a :class:`~condmoe.trainer.stop.SignalStop` is the
  handler, installed on the worker actor's main thread (Python runs signal
  handlers there only) by :class:`StopTorchConfig`'s backend when the worker
  group starts;
- Ray drains its node (a spot reclaim, ``ray drain-node``, a Kubernetes drain
  through KubeRay): Ray Train 2.60's PreemptionWatcher marks every worker of the
  group, read here from the worker's train context without a collective (the
  public ``ray.train.get_preemption_info()`` is a barrier through the
  controller, too dear for every step);
- the driver (``condmoe train``) got SIGTERM or Ctrl-C: it puts a stop request
  into Ray's internal key-value store under the launch's key.

The first two are "preempt": the worker writes a checkpoint and raises
:class:`Preempted`, so Ray Train restarts the group (charged to
``cluster.max_failures``) and it resumes there with no lost step. The last is
"stop": the workers checkpoint and return, the driver shuts everything down.
:class:`DriverSignals` and :func:`wait_for_fit` are the driver's half.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from condmoe.trainer.stop import PREEMPT, STOP, SignalStop

log = logging.getLogger(__name__)

KV_NAMESPACE = "condmoe"
POLL_S = 0.5  # how often a worker looks for the driver's stop request and a drain notice
STOP_MARGIN_S = 30.0  # the driver's wait past the grace period: a step to finish, the group to return


class Preempted(RuntimeError):
    """Raised by a worker after its preemption checkpoint, so Ray Train restarts the worker group."""


def stop_key(run_name: str, launch_id: str) -> str:
    """The internal-KV key of one launch's stop request."""
    return f"stop/{run_name}/{launch_id}"


# -- worker side ---------------------------------------------------------------------------------


def install_worker_signals(grace_s: float) -> int:
    """On the worker actor's main thread: SIGTERM becomes a stop request with ``grace_s`` seconds to
    commit the checkpoint. Returns the pid (for the log)."""
    import os

    stop = SignalStop(grace_s)
    stop.armed = False  # until a training function runs (WorkerStop): Ray's own SIGTERM ends an idle worker
    stop.install()
    return os.getpid()


class _StopBackend(_TorchBackend):
    """Ray Train's torch backend, plus condmoe's SIGTERM handler on every worker it starts."""

    def on_training_start(self, worker_group, backend_config: "StopTorchConfig") -> None:
        super().on_training_start(worker_group, backend_config)
        # RayTrainWorker.execute runs on the actor's main thread: the one place a handler can be set
        worker_group.execute(install_worker_signals, backend_config.grace_s)


@dataclass
class StopTorchConfig(TorchConfig):
    """TorchConfig whose workers handle SIGTERM with a checkpoint (``grace_s``: cluster.preempt_grace_s)."""

    grace_s: float = 30.0

    @property
    def backend_cls(self):
        return _StopBackend


def _drain_notice() -> Any:
    """Ray Train's preemption info of this worker (None: no drain), read without a collective."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - another Ray layout, or no train context: no drain notices
        return None


class WorkerStop:
    """A worker's stop source for the train loop: SIGTERM, Ray's drain notice, the driver's request.

    Use as a context manager around ``train(..., stop=...)``; ``poll`` and ``done`` are the loop's.
    """

    def __init__(self, key: str | None, grace_s: float) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        if isinstance(handler, SignalStop):
            self.signals = handler
        else:  # the backend hook did not run (another Ray layout): drain and driver requests still work
            log.warning("no condmoe SIGTERM handler in this worker: SIGTERM ends it without a checkpoint")
            self.signals = SignalStop(grace_s)
        self.key = key
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="condmoe-stop-watch", daemon=True)

    def __enter__(self) -> "WorkerStop":
        self.signals.armed = True
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.armed = False  # training is over: a SIGTERM now (Ray ending the actor) ends it at once
        self.signals.done()
        self._quit.set()

    def poll(self) -> int:
        return self.signals.poll()

    def done(self) -> None:
        self.signals.done()

    def _watch(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_get

        while not self._quit.wait(POLL_S):
            try:
                if self.key and _internal_kv_get(self.key, namespace=KV_NAMESPACE):
                    self.signals.request(STOP, "condmoe train was stopped")
            except Exception as exc:  # noqa: BLE001 - GCS briefly away: ask again next time
                log.debug("stop request poll failed: %s", exc)
            info = _drain_notice()
            if info is not None:
                self.signals.request(PREEMPT, f"node drain notice (ranks {info.preempted_ranks}, deadline "
                                              f"{info.deadline_ms} ms)")
            if self.signals.poll() == STOP:
                return


# -- driver side ---------------------------------------------------------------------------------


def request_stop(key: str) -> None:
    """Driver: ask the launch's workers to checkpoint and stop."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, b"1", overwrite=True, namespace=KV_NAMESPACE)


def clear_stop(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    try:
        _internal_kv_del(key, namespace=KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - the cluster is going away anyway
        log.debug("clearing the stop request: %s", exc)


class DriverSignals:
    """SIGTERM and SIGINT of ``condmoe train`` while a job runs: counted, acted on by :func:`wait_for_fit`.

    Only on the main thread (elsewhere a no-op); the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.count = 0
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "DriverSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __call__(self, signum: int, frame) -> None:
        self.count += 1
        self.signum = self.signum or signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@dataclass
class FitOutcome:
    """What :func:`wait_for_fit` saw: the fit's result or error, and whether a signal stopped the job."""

    result: Any = None
    error: BaseException | None = None
    signal: str = ""          # SIGTERM / SIGINT when the job was stopped
    abandoned: bool = False   # the workers did not return in time (or a second signal): torn down


def wait_for_fit(fit, signals: DriverSignals, key: str, grace_s: float) -> FitOutcome:
    """Run ``fit()`` (TorchTrainer.fit) in a thread and wait; on the first signal ask the workers to
    checkpoint and stop, and wait up to ``grace_s`` + STOP_MARGIN_S for them; a second signal stops
    waiting. (Ray Train's own SIGINT handler, which aborts the workers without a checkpoint, is only
    installed when fit runs on the main thread.)"""
    out = FitOutcome()

    def run() -> None:
        try:
            out.result = fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out.error = exc

    thread = threading.Thread(target=run, name="condmoe-fit", daemon=True)
    thread.start()
    deadline = None
    while thread.is_alive():
        thread.join(0.25)
        if signals.count and deadline is None:
            out.signal = signals.name
            log.warning("%s: the workers checkpoint at the next step and stop (up to %.0f s); a second "
                        "signal stops at once", out.signal, grace_s)
            try:
                request_stop(key)
            except Exception as exc:  # noqa: BLE001 - no GCS: nothing left to stop gracefully
                log.warning("could not ask the workers to stop: %s", exc)
                break
            deadline = time.monotonic() + grace_s + STOP_MARGIN_S
        if signals.count > 1 or (deadline is not None and time.monotonic() > deadline):
            break
    if thread.is_alive():
        out.abandoned = True
        log.warning("the workers did not stop in time; shutting the job down without them")
    return out
