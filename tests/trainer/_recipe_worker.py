"""Single-process DeepSpeed checks of the training recipe (tests/trainer/test_recipe.py runs it).

usage: python _recipe_worker.py SCENARIO OUT.json TMPDIR
scenarios: optimizers, cosine, ema. Batches are synthetic (seeded); prints nothing, writes JSON.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402,F401  (registers test_soft_cnn)
import torch  # noqa: E402

from condmoe.trainer.checkpoint import CheckpointManager  # noqa: E402
from condmoe.trainer.config import job_from_dict  # noqa: E402
from condmoe.trainer.ema import build_ema  # noqa: E402
from condmoe.trainer.engine import build_engine, setup_distributed  # noqa: E402
from condmoe.trainer.loop import evaluate  # noqa: E402
from condmoe.trainer.optim import cosine_lr  # noqa: E402


def _cfg(tmp: Path, optim: dict, **sections) -> object:
    tree = {"model": {"name": "test_soft_cnn", "size": "tiny", "experts": 4},
            "data": {"path": str(tmp), "batch_size": 16},
            "optim": {"lr": 0.01, "grad_clip": 0.0, **optim},
            "cluster": {"storage_path": str(tmp / "runs"), "name": "recipe"}, **sections}
    return job_from_dict(tree)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)


def _step(engine, i: int) -> float:
    x, y = _batch(i)
    out = engine(x, y)
    engine.backward(out.loss)
    engine.step()
    return float(out.loss)


def optimizers(tmp: Path) -> dict:
    """A few steps of every optimiser on one fixed batch: the loss falls; each keeps its state keys."""
    res = {}
    for name, optim in {"adam": {"optimizer": "adam"}, "adamw": {"optimizer": "adamw", "weight_decay": 0.05},
                        "sgd": {"optimizer": "sgd", "lr": 0.02},
                        "sgd_nesterov": {"optimizer": "sgd", "lr": 0.02, "nesterov": True, "weight_decay": 1e-4},
                        "rmsprop": {"optimizer": "rmsprop", "lr": 0.002, "weight_decay": 1e-5},
                        "rmsprop_zero2": {"optimizer": "rmsprop", "lr": 0.002}}.items():
        ds = {"zero_stage": 2, "zero_on_one_worker": True} if name.endswith("zero2") else {"zero_stage": 0}
        cfg = _cfg(tmp, {**optim, "schedule": "constant", "steps": 8}, deepspeed=ds)
        torch.manual_seed(0)
        engine = build_engine(cfg, 1)
        losses = [_step(engine, 0) for _ in range(8)]
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        keys = sorted({k for s in base.state.values() for k in s})
        res[name] = {"losses": losses, "optimizer": type(base).__name__, "state_keys": keys,
                     "zero": engine.zero_optimization_stage(),
                     "groups": [(g.get("name"), g["weight_decay"]) for g in base.param_groups],
                     "nesterov": [g.get("nesterov") for g in base.param_groups]}
    return res


def cosine(tmp: Path) -> dict:
    """The lr each optimiser step runs at, through DeepSpeed, against the formula; then portable resume."""
    o = {"optimizer": "sgd", "schedule": "cosine", "lr": 0.1, "min_lr": 0.01, "warmup_steps": 3, "steps": 10}
    cfg = _cfg(tmp, o)
    engine = build_engine(cfg, 1)
    seen = []
    for s in range(1, 11):
        seen.append(engine.optimizer.param_groups[0]["lr"])  # what step s will use
        _step(engine, s)
    expected = [cosine_lr(s, lr=0.1, min_lr=0.01, warmup_steps=3, total_steps=10) for s in range(1, 11)]
    # resume: a checkpoint at step 4 (portable path: a different ZeRO stage) continues the schedule
    cfg = _cfg(tmp, o)
    engine = build_engine(cfg, 1)
    for s in range(1, 5):
        _step(engine, s)
    mgr = CheckpointManager(tmp / "cosine_ckpt")
    path = mgr.save(engine, 4, {"ep_size": 1, "samples": 64})
    meta = json.loads((path / "meta.json").read_text())
    meta["zero_stage"] = 1  # pretend another stage saved it: restore through portable.pt
    (path / "meta.json").write_text(json.dumps(meta))
    fresh = build_engine(_cfg(tmp, o), 1)
    mgr.load(fresh, path, world_size=1, ep_size=1)
    resumed = [fresh.optimizer.param_groups[0]["lr"]]
    _step(fresh, 5)
    resumed.append(fresh.optimizer.param_groups[0]["lr"])
    return {"seen": seen, "expected": expected, "resumed": resumed, "scheduler": type(engine.lr_scheduler).__name__}


class _Loader:
    def __init__(self, n: int) -> None:
        self.batches = [_batch(100 + i) for i in range(n)]

    def __iter__(self):
        for x, y in self.batches:
            yield SimpleNamespace(images=x, labels=y, valid=torch.ones_like(y, dtype=torch.bool), keys=[])


def ema(tmp: Path) -> dict:
    """EMA after N steps vs the hand-computed average (every=1, every=2, TF warmup); the swap under
    ZeRO 2 restores the live weights bit for bit; evaluation with it; save + load restores it."""
    res = {}
    for name, e, ds in (("plain", {"decay": 0.9, "warmup": False}, {"zero_stage": 0}),
                        ("every2_warmup", {"decay": 0.95, "every": 2, "warmup": True}, {"zero_stage": 0}),
                        ("zero2", {"decay": 0.9, "warmup": False},
                         {"zero_stage": 2, "zero_on_one_worker": True})):
        cfg = _cfg(tmp, {"optimizer": "adam", "schedule": "constant", "steps": 6,
                         "ema": {"enabled": True, **e}}, deepspeed=ds)
        engine = build_engine(cfg, 1)
        tracker = build_ema(cfg, engine.module)
        live = lambda: {n: t.detach().float().clone() for n, t in tracker.live()}  # noqa: E731
        hand = live()
        for s in range(1, 7):
            _step(engine, s)
            tracker.update(s)
            if s % tracker.every == 0:
                d = min(tracker.decay, (1 + s) / (10 + s)) if tracker.warmup else tracker.decay
                d = d ** tracker.every
                hand = {n: d * hand[n] + (1 - d) * w for n, w in live().items()}
        err = max(float((tracker.shadow[n] - hand[n]).abs().max()) for n in hand)
        before = live()
        x, _ = _batch(7)
        engine.eval()
        with torch.no_grad():
            plain_logits = engine(x).logits
            with tracker.applied():
                ema_logits = engine(x).logits
                inside = max(float((t.float() - tracker.shadow[n]).abs().max()) for n, t in tracker.live())
            after_logits = engine(x).logits
        restored = all(torch.equal(before[n], t.float()) for n, t in tracker.live())
        # a reference module holding the EMA weights gives the same logits
        ref = build_engine(cfg, 1).module
        ref.load_state_dict({n: tracker.shadow.get(n, v) for n, v in ref.state_dict().items()})
        ref.eval()
        with torch.no_grad():
            ref_logits = ref(x).logits
        loader = _Loader(3)
        rec_live, rec_ema = evaluate(engine, loader), evaluate(engine, loader, ema=tracker)
        # training continues unharmed after the swap (ZeRO 2: flat buffers still hold the live weights)
        engine.train()
        next_loss = _step(engine, 8)
        # save + load into a fresh engine: the EMA comes back exactly
        mgr = CheckpointManager(tmp / f"ema_{name}", ema=tracker)
        path = mgr.save(engine, 7, {"ep_size": 1, "samples": 112})
        fresh = build_engine(cfg, 1)
        fresh_ema = build_ema(cfg, fresh.module)
        CheckpointManager(tmp / f"ema_{name}", ema=fresh_ema).load(fresh, path, world_size=1, ep_size=1)
        same_ema = all(torch.equal(fresh_ema.shadow[n], tracker.shadow[n]) for n in tracker.shadow)
        res[name] = {"err": err, "updates": tracker.updates, "ema_vs_live": float((ema_logits - plain_logits).abs().max()),
                     "ema_vs_ref": float((ema_logits - ref_logits).abs().max()), "inside": inside,
                     "after_equal": bool(torch.equal(after_logits, plain_logits)), "restored": restored,
                     "eval_flags": [rec_live.ema, rec_ema.ema], "next_loss": next_loss,
                     "finite": math.isfinite(next_loss), "same_ema": same_ema,
                     "ema_file": (path / "ema.pt").is_file(), "zero": engine.zero_optimization_stage()}
    return res


def main() -> None:
    scenario, out, tmp = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    cfg = _cfg(tmp, {})
    setup_distributed(cfg)
    out.write_text(json.dumps(globals()[scenario](tmp)))


if __name__ == "__main__":
    main()
