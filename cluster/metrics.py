"""Prometheus export of expert use and training health: one exporter per job.

The exporter (prometheus_client, its own registry and HTTP server) lives in a
Ray actor on the head node or, with no Ray around, in a child process of rank
0 (condmoe.cluster.exporter_hosts says where); either way scrapes never run in
a training process. Each worker's PrometheusSink (condmoe.cluster.sinks)
feeds it; rank 0 sends the aggregate of all ranks' RoutingStats (already
all-reduced by the train loop) every ``metrics.prometheus.every_n_steps``
steps; per-expert series carry the labels ``job``, ``layer``, ``expert`` and
never a rank, so cardinality stays layers x experts.

Names follow the Prometheus conventions: prefix ``condmoe_``, base units
(seconds, ratios), ``_total`` for counters. The metric ``job`` label clashes
with Prometheus' own target label: scrape with ``honor_labels: true`` (see
deploy/prometheus/prometheus.yml).

The update fed to :meth:`JobMetrics.apply` is a dict pickled once into the
exporter's process (RoutingStats travel as they are), every key optional::

    step: int                 last optimiser step covered
    steps, samples: int       new optimiser steps / training samples since the last update
    loss, eval_accuracy: float
    routing: {layer: RoutingStats}   new routing stats, summed over ranks
    step_seconds, data_wait_seconds, checkpoint_seconds: list[float]  observations
    bad_samples: {reason: int}                 new skipped samples
    restart: bool             a new worker group (after a failure) attached
    world_size: int           workers of the attempt that starts (a change counts a resize)
    stops: [str]              checkpoints written to stop early, by reason ("preempt", "stop")
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from condmoe.routing import RoutingStats

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
CKPT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class JobMetrics:
    """The metric families of one job, in their own registry."""

    def __init__(self, job: str, registry: CollectorRegistry | None = None) -> None:
        if not job:
            raise ValueError("JobMetrics needs a non-empty job name, got ''")
        self.job = job
        self.registry = r = registry or CollectorRegistry()
        lx, ll, lj = ("job", "layer", "expert"), ("job", "layer"), ("job",)
        self.assignments = Counter("condmoe_expert_assignments", "Items routed to each expert (hard routing, "
                                   "before capacity drops)", lx, registry=r)
        self.weight_sum = Counter("condmoe_expert_routing_weight", "Routing weights summed over samples per "
                                  "expert (soft routing)", lx, registry=r)
        self.weight_mean = Gauge("condmoe_expert_routing_weight_mean", "Mean routing weight per expert over "
                                 "the last update interval (soft routing)", lx, registry=r)
        self.share = Gauge("condmoe_expert_load_share_ratio", "Share of the layer's load carried by each expert "
                           "over the last update interval (0..1)", lx, registry=r)
        self.layer_info = Gauge("condmoe_layer_info", "Routed layers (value 1); kind is hard or soft",
                                ("job", "layer", "kind"), registry=r)
        self.layer_experts = Gauge("condmoe_layer_experts", "Experts of a routed layer", ll, registry=r)
        self.layer_samples = Counter("condmoe_layer_routed_samples", "Samples that reached the layer's router",
                                     ll, registry=r)
        self.dropped = Counter("condmoe_layer_dropped", "Items dropped because an expert was over capacity",
                               ll, registry=r)
        self.early_exits = Counter("condmoe_layer_early_exits", "Samples that left before the layer's experts",
                                   ll, registry=r)
        self.imbalance = Gauge("condmoe_layer_load_imbalance_ratio", "max/mean expert load over the last update "
                               "interval (1: balanced)", ll, registry=r)
        self.entropy = Gauge("condmoe_layer_routing_entropy_ratio", "Entropy of the expert load over the last "
                             "update interval, normalised to 0..1", ll, registry=r)
        # routing diversity (soft routing: how much the per-image mixtures differ, RoutingStats.from_weights):
        # gauges for the last interval, counters of the summable parts for run totals (condmoe experts URL)
        self.diversity = Gauge("condmoe_layer_routing_diversity_ratio", "Spread of the per-image routing "
                               "mixtures over the last update interval: RMS distance from their mean over its "
                               "maximum (0: one mixture for all images, 1: one-hot and balanced)", ll, registry=r)
        self.mixture_entropy = Gauge("condmoe_layer_mixture_entropy_ratio", "Mean per-image entropy of the "
                                     "routing mixtures over the last update interval, normalised to 0..1", ll,
                                     registry=r)
        self.mix_count = Counter("condmoe_layer_mixture_samples", "Images whose routing mixture was recorded",
                                 ll, registry=r)
        self.mix_sq = Counter("condmoe_layer_mixture_square_norm", "Squared L2 norms of the per-image routing "
                              "mixtures, summed", ll, registry=r)
        self.mix_entropy = Counter("condmoe_layer_mixture_entropy_nats", "Entropies of the per-image routing "
                                   "mixtures (nats), summed", ll, registry=r)
        self.mix_share = Counter("condmoe_expert_mixture_share", "Each expert's share of the per-image "
                                 "routing mixtures, summed over the images", lx, registry=r)
        self.steps = Counter("condmoe_train_steps", "Optimiser steps trained", lj, registry=r)
        self.samples = Counter("condmoe_train_samples", "Training samples consumed", lj, registry=r)
        self.last_step = Gauge("condmoe_train_last_step", "Last optimiser step reported", lj, registry=r)
        self.loss = Gauge("condmoe_train_loss", "Training loss (mean over ranks) at the last update", lj,
                          registry=r)
        self.accuracy = Gauge("condmoe_eval_accuracy_ratio", "Accuracy of the last evaluation", lj, registry=r)
        self.step_time = Histogram("condmoe_train_step_duration_seconds", "Wall time of one optimiser step "
                                   "(rank 0)", lj, buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram("condmoe_data_wait_seconds", "Time a worker waited for its next training "
                                   "batch (all ranks)", lj, buckets=WAIT_BUCKETS, registry=r)
        self.bad = Counter("condmoe_bad_samples_skipped", "Corrupt or unreadable samples skipped, by reason",
                           ("job", "reason"), registry=r)
        self.ckpt = Histogram("condmoe_checkpoint_duration_seconds", "Wall time of one checkpoint save", lj,
                              buckets=CKPT_BUCKETS, registry=r)
        self.restarts = Counter("condmoe_worker_restarts", "Worker-group restarts after failures", lj, registry=r)
        self.world_size = Gauge("condmoe_train_world_size", "Training workers of the current attempt", lj,
                                registry=r)
        self.resizes = Counter("condmoe_train_resizes", "Worker groups that started at another world size than "
                               "the one before (elastic jobs: a node lost or back)", lj, registry=r)
        self.stop_checkpoints = Counter("condmoe_preemption_checkpoints", "Checkpoints written at a step "
                                        "boundary to stop early: reason preempt (SIGTERM to a worker, node "
                                        "drain) or stop (condmoe train stopped)", ("job", "reason"), registry=r)
        self._world: int | None = None
        self.updated = Gauge("condmoe_last_update_timestamp_seconds", "Unix time of the last update", lj,
                             registry=r)
        # create the label-less-per-job series up front, so every family is in the exposition from the start
        for metric in (self.steps, self.samples, self.restarts, self.resizes, self.world_size):
            metric.labels(job)
        for reason in ("preempt", "stop"):
            self.stop_checkpoints.labels(job, reason)
        self.step_time.labels(job)
        self.data_wait.labels(job)
        self.ckpt.labels(job)

    def apply(self, update: dict[str, Any]) -> None:
        """Fold one update (see the module docstring) into the metrics."""
        job = self.job
        for name, stats in (update.get("routing") or {}).items():
            self._apply_layer(name, stats)
        if update.get("steps"):
            self.steps.labels(job).inc(int(update["steps"]))
        if update.get("samples"):
            self.samples.labels(job).inc(int(update["samples"]))
        if update.get("step") is not None:
            self.last_step.labels(job).set(int(update["step"]))
        if update.get("loss") is not None:
            self.loss.labels(job).set(float(update["loss"]))
        if update.get("eval_accuracy") is not None:
            self.accuracy.labels(job).set(float(update["eval_accuracy"]))
        for hist, key in ((self.step_time, "step_seconds"), (self.data_wait, "data_wait_seconds"),
                          (self.ckpt, "checkpoint_seconds")):
            child = hist.labels(job)
            for v in update.get(key) or ():
                child.observe(max(0.0, float(v)))
        for reason, n in (update.get("bad_samples") or {}).items():
            if n < 0:
                raise ValueError(f"bad_samples[{reason!r}] is negative: {n}")
            if n:
                self.bad.labels(job, str(reason)).inc(n)
        if update.get("restart"):
            self.restarts.labels(job).inc()
        if update.get("world_size"):
            world = int(update["world_size"])
            if self._world is not None and world != self._world:
                self.resizes.labels(job).inc()
            self._world = world
            self.world_size.labels(job).set(world)
        for reason in update.get("stops") or ():
            self.stop_checkpoints.labels(job, str(reason)).inc()
        self.updated.labels(job).set(time.time())

    def _apply_layer(self, name: str, s: RoutingStats) -> None:
        job = self.job
        self.layer_info.labels(job, name, s.kind).set(1)
        self.layer_experts.labels(job, name).set(s.num_experts)
        self.layer_samples.labels(job, name).inc(s.samples)
        self.dropped.labels(job, name).inc(s.dropped)
        self.early_exits.labels(job, name).inc(s.early_exits)
        self.imbalance.labels(job, name).set(s.imbalance)
        self.entropy.labels(job, name).set(s.entropy)
        if s.mix_count > 0 and s.mix_sum is not None:
            if s.diversity is not None:
                self.diversity.labels(job, name).set(s.diversity)
                self.mixture_entropy.labels(job, name).set(s.mixture_entropy)
            self.mix_count.labels(job, name).inc(s.mix_count)
            self.mix_sq.labels(job, name).inc(max(0.0, s.mix_sq))
            self.mix_entropy.labels(job, name).inc(max(0.0, s.mix_entropy))
            for e, value in enumerate(s.mix_sum.tolist()):
                self.mix_share.labels(job, name, str(e)).inc(max(0.0, value))
        share = s.fraction.tolist()
        for e, value in enumerate(s.load.tolist()):
            labels = (job, name, str(e))
            self.share.labels(*labels).set(share[e])
            if s.kind == "hard":
                self.assignments.labels(*labels).inc(value)
            else:
                self.weight_sum.labels(*labels).inc(value)
                self.weight_mean.labels(*labels).set(value / s.samples if s.samples else 0.0)

    def exposition(self) -> str:
        """The text exposition (what a scrape returns)."""
        return generate_latest(self.registry).decode()


def _tensor(values: list[float]):
    import torch

    return torch.tensor(values, dtype=torch.float64)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log on stderr
        pass


class MetricsExporter:
    """JobMetrics behind an HTTP server (``/metrics``); thread-safe, usable in any process.

    The exposition is rendered at most once per update: scrapes between two updates get the same
    bytes, so a scraper polling faster than the job reports costs almost nothing.
    """

    def __init__(self, job: str, host: str = "127.0.0.1", port: int = 0) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"exporter port must be 0..65535, got {port}")
        self.metrics = JobMetrics(job)
        self.host, self.port = host, int(port)
        self._server: WSGIServer | None = None
        self._lock = threading.Lock()
        self._sessions: set[str] = set()
        self._version = 0
        self._cache: tuple[int, bytes] | None = None
        self._scrapes = self._scrapes_at_update = 0
        self._last_scrape = 0.0

    def _app(self, environ: dict, start_response) -> list[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        with self._lock:
            if self._cache is None or self._cache[0] != self._version:
                self._cache = (self._version, generate_latest(self.metrics.registry))
            body = self._cache[1]
            self._scrapes += 1
            self._last_scrape = time.time()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [body]

    def _bind(self, port: int) -> WSGIServer:
        server_class = _Server6 if ":" in self.host else _Server
        return make_server(self.host, port, self._app, server_class=server_class, handler_class=_QuietHandler)

    def start(self) -> str:
        """Bind and serve; a taken port falls back to a free one (logged). Returns the URL."""
        try:
            self._server = self._bind(self.port)
        except OSError as exc:
            if self.port == 0:
                raise
            log.warning("exporter port %s:%d unavailable (%s); using a free port", self.host, self.port,
                        exc.strerror or exc)
            self._server = self._bind(0)
        self.port = int(self._server.server_port)
        threading.Thread(target=self._server.serve_forever, name=f"exporter-{self.metrics.job}",
                         daemon=True).start()
        log.info("Prometheus exporter for job %s: %s", self.metrics.job, self.url)
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def update(self, update: dict[str, Any]) -> None:
        with self._lock:
            self.metrics.apply(update)
            self._version += 1
            self._scrapes_at_update = self._scrapes

    def attach(self, session: str) -> bool:
        """Rank 0 of a worker group says hello; every group after the first counts a restart."""
        with self._lock:
            restart = bool(self._sessions) and session not in self._sessions
            self._sessions.add(session)
            if restart:
                self.metrics.apply({"restart": True})
                self._version += 1
            return restart

    def scrape_state(self) -> dict[str, float]:
        """Scrapes so far, and how many happened after the last update."""
        with self._lock:
            return {"scrapes": self._scrapes, "since_update": self._scrapes - self._scrapes_at_update,
                    "last": self._last_scrape}

    def exposition(self) -> str:
        with self._lock:
            return self.metrics.exposition()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

def parse_exposition(text: str, job: str | None = None) -> dict[str, RoutingStats]:
    """Rebuild run-total RoutingStats per layer from an exposition (``condmoe experts URL``)."""
    kinds: dict[str, str] = {}
    loads: dict[str, dict[int, float]] = {}
    mixes: dict[str, dict[int, float]] = {}
    extra: dict[str, dict[str, float]] = {}
    jobs: set[str] = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            lab = s.labels
            if "job" in lab:
                jobs.add(lab["job"])
            if job is not None and lab.get("job") != job:
                continue
            if s.name == "condmoe_layer_info":
                kinds[lab["layer"]] = lab["kind"]
            elif s.name in ("condmoe_expert_assignments_total", "condmoe_expert_routing_weight_total"):
                loads.setdefault(lab["layer"], {})[int(lab["expert"])] = s.value
            elif s.name == "condmoe_expert_mixture_share_total":
                mixes.setdefault(lab["layer"], {})[int(lab["expert"])] = s.value
            elif s.name in ("condmoe_layer_routed_samples_total", "condmoe_layer_dropped_total",
                            "condmoe_layer_early_exits_total", "condmoe_layer_mixture_samples_total",
                            "condmoe_layer_mixture_square_norm_total", "condmoe_layer_mixture_entropy_nats_total"):
                extra.setdefault(lab["layer"], {})[s.name] = s.value
    if job is None and len(jobs) > 1:
        raise ValueError(f"the exposition holds several jobs {sorted(jobs)}; name one")
    out: dict[str, RoutingStats] = {}
    for layer in sorted(loads):
        per = loads[layer]
        e = extra.get(layer, {})
        experts = max(per) + 1
        stats = RoutingStats.from_load(
            _tensor([per.get(i, 0.0) for i in range(experts)]),
            int(e.get("condmoe_layer_routed_samples_total", 0)),
            dropped=int(e.get("condmoe_layer_dropped_total", 0)),
            early_exits=int(e.get("condmoe_layer_early_exits_total", 0)), kind=kinds.get(layer, "hard"))
        count = int(e.get("condmoe_layer_mixture_samples_total", 0))
        if count > 0 and layer in mixes:
            stats = RoutingStats.from_dict({
                **stats.as_dict(), "mix_sum": [mixes[layer].get(i, 0.0) for i in range(experts)],
                "mix_sq": e.get("condmoe_layer_mixture_square_norm_total", 0.0),
                "mix_entropy": e.get("condmoe_layer_mixture_entropy_nats_total", 0.0), "mix_count": count})
        out[layer] = stats
    return out
