"""Sweeps: the cross product of job variants, run as trials on Ray Tune, one row per trial.

A sweep is (base job file, ``--set`` overrides) x named variants (each a list
of overrides) x grid keys (``KEY=V1,V2``) x seeds. Each trial is a normal
condmoe training job: a Tune function trainable (:func:`run_trial`) calls
:func:`condmoe.cluster.launch.launch`, which runs the job's own Ray Train
TorchTrainer (Ray Train V2 inside Ray Tune: the trial is only a driver, so it
reserves 0.01 CPU, and Tune's ``max_concurrent_trials`` keeps the trials'
worker groups within the cluster's CPUs). Every trial has its own run
directory, checkpoints and Prometheus job label: ``cluster.name`` is
``<sweep>-<trial id>``, the trial id a readable slug of its overrides plus a
hash of them, so the same trial gets the same name in every attempt.

Layout under ``<storage_path>/<sweep>/``::

    sweep.json                 the spec (job, overrides, variants, grid, seeds)
    runs/<sweep>-<trial>/      each trial's run directory (metrics.jsonl, Parquet log, checkpoints)
    trials/<trial>.json        written when a trial finished: its row (the done marker)
    trials.parquet             one row per finished trial (rebuilt at the end of every attempt)
    tune/attempt-N/            Ray Tune's own experiment directory

Resumable: a restarted sweep (after a crash, a kill or Ctrl-C) skips every
trial with a done marker; an unfinished trial runs again under the same name,
so its training resumes from its own newest checkpoint.

Seeds: ``--seeds N`` runs seeds 0..N-1, each setting ``optim.seed`` (model
initialisation) and ``data.seed`` (sample order). Every trial evaluates on the
whole evaluation split (``metrics.eval_batches`` is unset).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from condmoe.trainer.config import JobConfig, apply_overrides, job_from_dict, load_job, parse_override

log = logging.getLogger(__name__)

DRIVER_CPU = 0.01  # what a trial's driver (the Tune function) reserves; its workers reserve the rest


def split_values(text: str) -> list[str]:
    """``"1,4,[1,2],x"`` -> ["1", "4", "[1,2]", "x"]: commas inside brackets or braces do not split."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [v for v in out if v != ""]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["model.experts=1,4,8"]`` -> {"model.experts": ["1", "4", "8"]} (values stay as typed)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        values = split_values(raw)
        if not key or not values:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key in grid:
            raise ValueError(f"--grid {key!r} given twice")
        if key in ("seed", "variant"):
            raise ValueError(f"--grid {key!r}: use --seeds / --variant")
        grid[key] = values
    return grid


def parse_variants(items: list[list[str]]) -> dict[str, list[str]]:
    """``[["thin", "model.experts=1"], ["routed"]]`` -> {"thin": ["model.experts=1"], "routed": []}."""
    variants: dict[str, list[str]] = {}
    for item in items:
        name, *overrides = item
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise ValueError(f"--variant name {name!r}: letters, digits and _ . + - only")
        if name in variants:
            raise ValueError(f"--variant {name!r} given twice")
        for o in overrides:
            parse_override(o)  # KEY=VALUE or a clear error
        variants[name] = list(overrides)
    return variants


def _value(raw: str) -> Any:
    return parse_override(f"x={raw}")[1]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "", text)[:24]


@dataclass(frozen=True)
class Trial:
    """One job of the sweep: ``overrides`` on the base job, ``params`` the varied values."""

    trial_id: str
    variant: str | None
    seed: int
    params: dict[str, Any]
    overrides: list[str]


@dataclass
class SweepSpec:
    """What ``condmoe sweep`` was asked to run (stored as sweep.json)."""

    name: str
    job: dict                      # the base job after --set, validated (cluster.name = the sweep)
    grid: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=dict)
    seeds: int = 1
    exit_thresholds: list[float] | None = None  # early-exit families: curves from each trial's checkpoint

    @property
    def storage(self) -> Path:
        return Path(self.job["cluster"]["storage_path"]).expanduser().resolve()

    @property
    def dir(self) -> Path:
        return self.storage / self.name

    def trials(self) -> list[Trial]:
        """The cross product variants x grid x seeds, in a stable order."""
        import itertools

        keys = list(self.grid)
        variants = list(self.variants.items()) or [(None, [])]
        out = []
        for (vname, vover), combo, seed in itertools.product(
                variants, itertools.product(*(self.grid[k] for k in keys)), range(self.seeds)):
            grid_over = [f"{k}={v}" for k, v in zip(keys, combo)]
            overrides = [*vover, *grid_over, f"optim.seed={seed}", f"data.seed={seed}"]
            params: dict[str, Any] = {}
            if vname is not None:
                params["variant"] = vname
            params.update({k: _value(v) for k, v in zip(keys, combo)})
            params["seed"] = seed
            digest = hashlib.sha1(json.dumps(overrides).encode()).hexdigest()[:6]
            parts = ([vname] if vname else []) + [f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in zip(keys, combo)]
            slug = "-".join(_slug(p) for p in parts + [f"s{seed}"])
            out.append(Trial(f"{slug}-{digest}", vname, seed, params, overrides))
        return out

    def trial_job(self, trial: Trial) -> JobConfig:
        """The trial's validated job: base + its overrides, its own run name under <sweep>/runs."""
        tree = json.loads(json.dumps(self.job))
        names = [value for keys, value in map(parse_override, trial.overrides) if keys == ["model", "name"]]
        if names and names[-1] != tree["model"]["name"]:
            tree["model"].pop("options", None)  # another family: the base job's options are not its own
        tree = apply_overrides(tree, [*trial.overrides, f"cluster.name={self.name}-{trial.trial_id}",
                                      f"cluster.storage_path={self.dir / 'runs'}"])
        tree.setdefault("metrics", {})["eval_batches"] = None  # the whole evaluation split
        return job_from_dict(tree, source=f"sweep {self.name}, trial {trial.trial_id}")

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".sweep.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, self.dir / "sweep.json")

    @classmethod
    def load(cls, sweep_dir: str | Path) -> "SweepSpec":
        path = Path(sweep_dir) / "sweep.json"
        if not path.is_file():
            raise FileNotFoundError(f"{str(sweep_dir)!r} is not a sweep directory (no sweep.json)")
        return cls(**json.loads(path.read_text()))


def make_spec(job_path: str, *, overrides: list[str] | None = None, grid: list[str] | None = None,
              variants: list[list[str]] | None = None, seeds: int = 1, name: str | None = None,
              exit_thresholds: list[float] | None = None) -> SweepSpec:
    """Load and validate the base job and every trial's job (a bad key fails here, before Ray)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    cfg = load_job(job_path, overrides)
    if "://" in cfg.cluster.storage_path:
        raise ValueError(f"a sweep keeps its table and done markers in a local (or shared) folder: "
                         f"cluster.storage_path {cfg.cluster.storage_path!r} is a URL")
    name = name or f"{Path(job_path).stem}-sweep"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise ValueError(f"sweep name {name!r}: letters, digits and _ . + - only")
    spec = SweepSpec(name=name, job=json.loads(cfg.model_dump_json()), grid=parse_grid(grid or []),
                     variants=parse_variants(variants or []), seeds=seeds, exit_thresholds=exit_thresholds)
    for trial in spec.trials():
        spec.trial_job(trial)
    return spec


# --- one trial (runs inside a Ray Tune trial actor) ---------------------------------------------------

def _count_params(cfg: JobConfig) -> int:
    from condmoe.trainer.engine import build_model

    one = cfg.model_copy(deep=True)
    one.model.ep_size = 1  # the same parameters, all experts on one process
    return int(sum(p.numel() for p in build_model(one).parameters()))


def _throughput(run_dir: Path) -> tuple[float | None, float]:
    """(training images/s over the whole run, training seconds) from metrics.jsonl's step records."""
    from condmoe.trainer.records import read_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, 0.0
    steps = [r for r in read_jsonl(path, "step") if r.get("samples_per_s")]
    seconds = sum(r["samples"] / r["samples_per_s"] for r in steps)
    samples = sum(r["samples"] for r in steps)
    return (samples / seconds if seconds > 0 else None), seconds


def _routing_summary(meta: dict) -> dict[str, Any]:
    """static: no routed layer with more than one expert; diversity: mean over soft layers."""
    from condmoe.routing import RoutingStats

    layers = {n: RoutingStats.from_dict(d) for n, d in (meta.get("routing") or {}).items()}
    routed = [s for s in layers.values() if s.num_experts > 1]
    div = [s.diversity for s in routed if s.diversity is not None]
    return {"routed_layers": len(routed), "static": not routed,
            "routing_diversity": sum(div) / len(div) if div else None}


def exit_curve_subprocess(run_dir: Path, thresholds: list[float], out: Path, timeout_s: float = 3600) -> dict:
    """``condmoe eval RUN --exit-thresholds ...`` in a fresh process (its own single-process world)."""
    cmd = [sys.executable, "-m", "condmoe.cluster.cli", "eval", str(run_dir), "--json",
           "--exit-thresholds", ",".join(repr(float(t)) for t in thresholds), "--out", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"exit curve of {run_dir} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_trial(config: dict) -> None:
    """Ray Tune's function trainable: train one trial's job with its own Ray Train workers, then
    write its row (the done marker) and report it to Tune."""
    from ray import tune

    from condmoe.trainer.checkpoint import read_meta

    from .launch import launch

    spec = SweepSpec(**config["spec"])
    trial = next(t for t in spec.trials() if t.trial_id == config["trial_id"])
    cfg = spec.trial_job(trial)
    params = _count_params(cfg)
    t0 = time.time()
    res = launch(cfg)
    wall = time.time() - t0
    if res.error or getattr(res, "stopped", None):
        raise RuntimeError(f"trial {trial.trial_id} did not finish: {res.error or 'stopped'}")
    m = res.metrics
    meta = read_meta(res.checkpoint) if res.checkpoint is not None else {}
    images_per_s, train_s = _throughput(cfg.run_dir)
    row: dict[str, Any] = {
        "sweep": spec.name, "trial": trial.trial_id, "run": cfg.run_name, **trial.params,
        "model": cfg.model.name, "size": cfg.model.size, "experts": cfg.model.experts,
        "steps": int(m.get("step", 0)), "accuracy": m.get("eval_accuracy"),
        "eval_samples": m.get("eval_samples"), "macs_per_sample": m.get("eval_macs_per_sample"),
        "exit_rate": m.get("eval_exit_rate"), "params": params, "wall_s": wall, "train_s": train_s,
        "images_per_s": images_per_s, **_routing_summary(meta),
        "run_dir": str(cfg.run_dir), "checkpoint": str(res.checkpoint), "exit_curve": None,
    }
    if spec.exit_thresholds and hasattr(cfg.model.options, "exit_threshold"):
        curve = exit_curve_subprocess(cfg.run_dir, spec.exit_thresholds, cfg.run_dir / "exit_curve")
        row["exit_curve"] = str(cfg.run_dir / "exit_curve.json")
        row["full_accuracy"], row["light_accuracy"] = curve["full"]["accuracy"], curve["light"]["accuracy"]
    mark_done(spec.dir, trial.trial_id, row)
    tune.report({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


# --- done markers and the table ----------------------------------------------------------------------

def mark_done(sweep_dir: Path, trial_id: str, row: dict) -> None:
    folder = Path(sweep_dir) / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{trial_id}.json.tmp"
    tmp.write_text(json.dumps(row, default=str) + "\n")
    os.replace(tmp, folder / f"{trial_id}.json")  # the marker appears whole or not at all


def done_rows(sweep_dir: str | Path) -> dict[str, dict]:
    folder = Path(sweep_dir) / "trials"
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _column(values: list) -> list:
    """One Parquet column: numbers stay numbers (ints and floats mixed -> float), lists and
    mixed types become their JSON text."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, bool) for v in present) or all(isinstance(v, str) for v in present):
        return values
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return values if all(isinstance(v, int) for v in present) else [None if v is None else float(v)
                                                                          for v in values]
    return [None if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values]


def write_table(sweep_dir: str | Path, rows: list[dict]) -> Path:
    """``trials.parquet``: one row per finished trial, every varied key a column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    table = pa.table({k: _column([r.get(k) for r in rows]) for k in keys}) if rows else pa.table({})
    out = Path(sweep_dir) / "trials.parquet"
    tmp = out.with_name(".trials.parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


def read_table(sweep_dir: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(sweep_dir) / "trials.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no trials.parquet in {str(sweep_dir)!r} (has the sweep run?)")
    return pq.read_table(path).to_pylist()


# --- the driver -------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict]
    ran: list[str]          # trial ids run in this attempt
    skipped: list[str]      # already done before
    failed: list[str]
    table: Path
    max_concurrent: int
    wall_s: float


def _init_ray(cfg: JobConfig, address: str | None, cpus: int | None,
              per_trial: float) -> tuple[bool, float, float]:
    """Connect to ``address`` or start an embedded Ray; returns (we started it, its CPUs, its GPUs)."""
    import ray

    from .launch import worker_env

    env = {"env_vars": worker_env(cfg)}
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            n = max(int(cpus or os.cpu_count() or 1), math.ceil(per_trial))
            for attempt in (1, 2):
                try:
                    # +1: the trials' drivers (DRIVER_CPU each) and the exporters (0 CPU) fit beside the workers
                    ray.init(address="local", num_cpus=n + 1, include_dashboard=True, runtime_env=env,
                             log_to_driver=True, configure_logging=False)
                    break
                except Exception as exc:  # noqa: BLE001 - Ray waits a fixed 30 s for its raylet
                    if attempt == 2 or "timed out during startup" not in str(exc):
                        raise
                    log.warning("embedded Ray did not start in time (a busy machine?): trying once more")
                    ray.shutdown()
        started = True
    res = ray.cluster_resources()
    return started, float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0))


def max_concurrent_trials(total_cpus: float, per_trial: float, requested: int | None = None, *,
                          gpus: float = 0.0, per_trial_gpus: float = 0.0) -> int:
    """As many trials at once as the cluster holds (each: its workers' CPUs and GPUs + its driver's CPU)."""
    fit = int(total_cpus // (per_trial + DRIVER_CPU))
    if per_trial_gpus > 0:
        fit = min(fit, int(gpus // per_trial_gpus))
    fit = max(1, fit)
    return min(fit, requested) if requested else fit


def run_sweep(spec: SweepSpec, *, address: str | None = None, cpus: int | None = None,
              max_concurrent: int | None = None) -> SweepResult:
    """Run every trial of ``spec`` without a done marker on Ray Tune; write trials.parquet."""
    from .launch import preflight

    t0 = time.time()
    spec.save()
    trials = spec.trials()
    done = done_rows(spec.dir)
    pending = [t for t in trials if t.trial_id not in done]
    skipped = [t.trial_id for t in trials if t.trial_id in done]
    if skipped:
        log.info("sweep %s: %d of %d trials already done, skipped", spec.name, len(skipped), len(trials))
    jobs = {t.trial_id: spec.trial_job(t) for t in pending}
    for cfg in jobs.values():
        preflight(cfg)  # topology, the model built once, the data: a bad trial fails before Ray starts
    address = address or spec.job["cluster"].get("address") or os.environ.get("RAY_ADDRESS")
    per_trial = max((c.cluster.max_workers * c.cluster.cpus_per_worker for c in jobs.values()), default=1.0)
    failed: list[str] = []
    concurrency = 1
    if pending:
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the trials' drivers get it from worker_env too
        base = next(iter(jobs.values()))
        started, total, gpus = _init_ray(base, address, cpus, per_trial)
        per_gpu = max((c.cluster.max_workers if c.cluster.use_gpu else 0 for c in jobs.values()), default=0)
        concurrency = max_concurrent_trials(total, per_trial, max_concurrent, gpus=gpus, per_trial_gpus=per_gpu)
        log.info("sweep %s: %d trials to run, %d at once (%.0f CPUs, %.2f per trial)", spec.name,
                 len(pending), concurrency, total, per_trial)
        try:
            failed = _tune(spec, pending, concurrency)
        finally:
            if started:
                import ray

                ray.shutdown()
    rows_by_id = done_rows(spec.dir)
    rows = [rows_by_id[t.trial_id] for t in trials if t.trial_id in rows_by_id]
    table = write_table(spec.dir, rows)
    return SweepResult(spec.dir, rows, [t.trial_id for t in pending if t.trial_id in rows_by_id], skipped,
                       failed, table, concurrency, time.time() - t0)


def _tune(spec: SweepSpec, pending: list[Trial], concurrency: int) -> list[str]:
    """The pending trials as one Tune experiment; returns the ids of trials that failed."""
    from ray import tune

    attempt = 1 + sum(1 for _ in (spec.dir / "tune").glob("attempt-*")) if (spec.dir / "tune").is_dir() else 1
    # Tune's table shows the one varied key, the trial id; each trial finds its job in the spec
    space = {"spec": asdict(spec), "trial_id": tune.grid_search([t.trial_id for t in pending])}

    def name(trial) -> str:
        return trial.config["trial_id"]

    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"CPU": DRIVER_CPU}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_name_creator=name,
                                    trial_dirname_creator=name),
        run_config=tune.RunConfig(name=f"attempt-{attempt}", storage_path=str(spec.dir / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )
    grid = tuner.fit()
    failed = []
    for result in grid:
        if result.error is not None:
            tid = (result.config or {}).get("trial_id", "?")
            failed.append(tid)
            log.error("sweep %s: trial %s failed: %s", spec.name, tid, str(result.error).strip().splitlines()[:1])
    return failed
