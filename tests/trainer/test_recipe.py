"""The training recipe fields the papers rely on: cosine decay, label smoothing, no weight decay on
norms and biases, SGD with Nesterov and TensorFlow's RMSProp, an EMA of the weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_models  # noqa: F401  (registers test_soft_cnn / test_moe_cnn)
from condmoe.routing import build_model, list_models
from condmoe.trainer.checkpoint import list_checkpoints
from condmoe.trainer.config import ConfigError, deepspeed_config, job_from_dict
from condmoe.trainer.optim import CosineSchedule, RMSpropTF, cosine_lr, no_decay_names, param_groups

from trainer_testlib import run_workers, tiny_job

HERE = Path(__file__).resolve().parent


def _job(optim: dict | None = None, model: dict | None = None, **sections) -> dict:
    return {"model": model or {"name": "condconv_cnn", "size": "tiny", "experts": 4},
            "data": {"path": "/x", "batch_size": 32}, "optim": optim or {}, **sections}


def _worker(scenario: str, tmp_path: Path) -> dict:
    """tests/trainer/_recipe_worker.py SCENARIO in its own process (a one-rank DeepSpeed world)."""
    out = tmp_path / f"{scenario}.json"
    p = subprocess.run([sys.executable, str(HERE / "_recipe_worker.py"), scenario, str(out), str(tmp_path)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("optim, message", [
    ({"optimizer": "adamw", "nesterov": True}, "nesterov needs optimizer sgd"),
    ({"optimizer": "sgd", "momentum": 0.0, "nesterov": True}, "momentum > 0"),
    ({"schedule": "cosine", "lr": 0.1, "min_lr": 0.1}, "min_lr=0.1 must be below lr=0.1"),
    ({"label_smoothing": 1.0}, "optim.label_smoothing"),
    ({"ema": {"enabled": True, "decay": 1.0}}, "optim.ema.decay"),
    ({"ema": {"every": 0}}, "optim.ema.every"),
    ({"optimizer": "rmsprop", "alpha": 1.0}, "optim.alpha"),
])
def test_bad_recipe_values_are_one_line_config_errors(optim, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        job_from_dict(_job(optim))
    assert "\n" not in str(err.value)


def test_ema_with_zero3_is_refused():
    with pytest.raises(ConfigError, match="optim.ema needs deepspeed.zero_stage <= 2"):
        job_from_dict(_job({"ema": {"enabled": True}}, deepspeed={"zero_stage": 3}))


def test_deepspeed_json_of_the_recipe():
    sgd = deepspeed_config(job_from_dict(_job({"optimizer": "sgd", "nesterov": True, "schedule": "cosine"})), 2)
    assert sgd["optimizer"] == {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9, "nesterov": True,
                                                          "weight_decay": 0.0}}
    assert "scheduler" not in sgd  # the cosine schedule is condmoe.trainer.optim.CosineSchedule
    assert sgd["zero_allow_untested_optimizer"] is True  # ZeRO 2 on 2 workers with torch's SGD
    rms = deepspeed_config(job_from_dict(_job({"optimizer": "rmsprop"})), 2)
    assert "optimizer" not in rms and rms["zero_allow_untested_optimizer"] is True
    adam = deepspeed_config(job_from_dict(_job({"eps": 1e-6})), 2)
    assert adam["optimizer"]["params"]["eps"] == 1e-6 and "zero_allow_untested_optimizer" not in adam


# ---------------------------------------------------------------- cosine
def test_cosine_formula():
    lrs = [cosine_lr(s, lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=12) for s in range(1, 15)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up, peak at the last warm-up step
    for s in range(5, 13):
        assert lrs[s - 1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 8)))
    assert lrs[11:] == pytest.approx([0.1] * 3)  # min_lr at the last step, and after it
    assert cosine_lr(1, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 10)))


def test_cosine_schedule_state_round_trip():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.2)
    sched = CosineSchedule(opt, lr=0.2, min_lr=0.0, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen == pytest.approx([cosine_lr(s, lr=0.2, min_lr=0.0, warmup_steps=2, total_steps=6)
                                  for s in range(1, 7)])
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.2)
    again = CosineSchedule(other, lr=0.2, min_lr=0.0, warmup_steps=2, total_steps=6)
    state = CosineSchedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2), lr=0.2, min_lr=0.0,
                           warmup_steps=2, total_steps=6)
    for _ in range(3):
        state.step()
    again.load_state_dict(state.state_dict())
    assert other.param_groups[0]["lr"] == pytest.approx(cosine_lr(4, lr=0.2, min_lr=0.0, warmup_steps=2,
                                                                   total_steps=6))


@pytest.mark.slow
def test_cosine_through_deepspeed_and_portable_resume(tmp_path):
    res = _worker("cosine", tmp_path)
    assert res["scheduler"] == "CosineSchedule"
    assert res["seen"] == pytest.approx(res["expected"], rel=1e-12)
    assert res["resumed"] == pytest.approx(res["expected"][4:6], rel=1e-12)  # steps 5 and 6 after step 4


# ---------------------------------------------------------------- label smoothing
@pytest.mark.parametrize("family", ["condconv_cnn", "cigt_lenet", "coe_cnn"])
def test_label_smoothing_reaches_the_loss(family):
    """Soft (CondConv) and hard (CIGT, CoE) families: the task loss is torch's smoothed cross-entropy."""
    x, y = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 10
    torch.manual_seed(0)
    model = build_model(family, "tiny", label_smoothing=0.2).train()  # the training loss
    out = model(x, y)
    smoothed = float(F.cross_entropy(out.logits, y, label_smoothing=0.2))
    assert float(out.losses["ce"]) == pytest.approx(smoothed, rel=1e-6)
    assert abs(smoothed - float(F.cross_entropy(out.logits, y))) > 1e-4
    if family == "condconv_cnn":
        assert float(out.loss) == pytest.approx(float(F.cross_entropy(out.logits, y, label_smoothing=0.2)))


def test_every_family_takes_label_smoothing():
    for name, sizes in list_models().items():
        assert build_model(name, sizes[0], label_smoothing=0.1).label_smoothing == 0.1, name
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        build_model("condconv_cnn", "tiny", label_smoothing=1.0)


# ---------------------------------------------------------------- weight decay groups
def _names(model: nn.Module, groups: list[dict]) -> list[tuple[str, float, bool, set[str]]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [(g["name"], g["weight_decay"], bool(g.get("moe")), {by_id[id(p)] for p in g["params"]}) for g in groups]


def test_no_decay_on_norms_and_biases():
    cfg = job_from_dict(_job({"weight_decay": 0.05}))
    torch.manual_seed(0)
    model = build_model("condconv_cnn", "tiny")
    groups = _names(model, param_groups(model, cfg))
    assert [(n, wd) for n, wd, _, _ in groups] == [("decay", 0.05), ("no_decay", 0.0)]
    decay, exempt = groups[0][3], groups[1][3]
    params = dict(model.named_parameters())
    assert decay | exempt == set(params) and not decay & exempt
    norms = {f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)
             for n, _ in mod.named_parameters(recurse=False)}
    assert norms and norms <= exempt
    assert {n for n in params if n.endswith(".bias")} <= exempt
    assert all(params[n].ndim > 1 and not n.endswith("bias") for n in decay)
    # CondConv's per-expert biases are 2-D (E, C_out): still biases
    cond = [n for n, p in params.items() if n.endswith("bias") and p.ndim == 2]
    assert all(n in exempt for n in cond)
    # off, or no weight decay at all: one group
    off = job_from_dict(_job({"weight_decay": 0.05, "no_decay_norm_bias": False}))
    assert [(n, wd) for n, wd, _, _ in _names(model, param_groups(model, off))] == [("decay", 0.05)]
    plain = job_from_dict(_job({}))
    assert [(n, wd) for n, wd, _, _ in _names(model, param_groups(model, plain))] == [("decay", 0.0)]


def test_decay_groups_with_deepspeed_moe_groups():
    """Expert params keep their own (MoE) groups, split by decay like the dense ones."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = job_from_dict(_job({"weight_decay": 0.1}, model={"name": "test_moe_cnn", "size": "tiny",
                                                            "experts": 4}))
    torch.manual_seed(0)
    model = build_model("test_moe_cnn", "tiny", experts=4)
    groups = _names(model, param_groups(model, cfg))
    summary = [(n, wd, moe) for n, wd, moe, _ in groups]
    assert summary == [("decay", 0.1, False), ("no_decay", 0.0, False),
                       ("ep_size_1", 0.1, True), ("ep_size_1", 0.0, True)]
    expert = {n for n in dict(model.named_parameters()) if "deepspeed_experts" in n}
    assert groups[2][3] | groups[3][3] == expert
    assert all(n.endswith("weight") for n in groups[2][3]) and all(n.endswith("bias") for n in groups[3][3])
    assert not (groups[0][3] | groups[1][3]) & expert
    assert no_decay_names(model) == groups[1][3] | groups[3][3]


# ---------------------------------------------------------------- optimisers
def test_rmsprop_tf_matches_tensorflow_formula():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = RMSpropTF([p], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=0.01)
    w, ms, mom = p.detach().clone(), torch.ones(2), torch.zeros(2)
    for g in ([0.5, -1.0], [0.2, 0.3], [-0.4, 0.1]):
        p.grad = torch.tensor(g)
        opt.step()
        grad = torch.tensor(g) + 0.01 * w
        ms = 0.9 * ms + 0.1 * grad * grad
        mom = 0.9 * mom + 0.1 * grad / torch.sqrt(ms + 1e-3)
        w = w - mom
    assert torch.allclose(p.detach(), w, atol=1e-7)
    assert sorted(opt.state[p]) == ["momentum_buffer", "square_avg", "step"] and int(opt.state[p]["step"]) == 3


@pytest.mark.slow
def test_every_optimizer_trains_through_deepspeed(tmp_path):
    res = _worker("optimizers", tmp_path)
    for name, r in res.items():
        assert r["losses"][-1] < r["losses"][0], (name, r["losses"])
    assert res["rmsprop"]["optimizer"] == "RMSpropTF" and res["rmsprop_zero2"]["zero"] == 2
    assert res["rmsprop"]["state_keys"] == ["momentum_buffer", "square_avg", "step"]
    assert res["rmsprop_zero2"]["losses"] == pytest.approx(res["rmsprop"]["losses"], rel=1e-5)
    assert res["sgd_nesterov"]["nesterov"] == [True, True] and res["sgd"]["nesterov"] == [False]
    assert res["sgd_nesterov"]["losses"][2] != pytest.approx(res["sgd"]["losses"][2], rel=1e-4)
    assert res["sgd_nesterov"]["groups"] == [["decay", 1e-4], ["no_decay", 0.0]]
    assert res["adamw"]["groups"] == [["decay", 0.05], ["no_decay", 0.0]]


# ---------------------------------------------------------------- EMA
@pytest.mark.slow
def test_ema_average_swap_and_checkpoint(tmp_path):
    res = _worker("ema", tmp_path)
    assert res["zero2"]["zero"] == 2  # the swap under ZeRO 2's flat buffers too
    for name, r in res.items():
        assert r["err"] < 1e-6, name  # the hand-computed average
        assert r["updates"] == (3 if name == "every2_warmup" else 6)
        assert r["ema_vs_live"] > 1e-3 and r["ema_vs_ref"] < 1e-6 and r["inside"] == 0.0, name
        assert r["restored"] and r["after_equal"], name  # live weights back, bit for bit
        assert r["eval_flags"] == [False, True]
        assert r["same_ema"] and r["ema_file"], name


@pytest.mark.slow
@pytest.mark.multiproc
def test_recipe_resumes_exactly_on_other_world_and_ep_size(job_file, tmp_path, fmnist_shards):
    """RMSprop + cosine + EMA + weight decay groups + label smoothing, expert parallel: a 2-worker
    ep 2 run resumed at step 3 on ONE worker (portable state, ep 1), and on 2 workers (DeepSpeed's
    own load), trains steps 4-6 with the same losses and ends with the same EMA (experts by global
    id) as the uninterrupted run."""
    job = tiny_job(fmnist_shards, "test_moe_cnn", steps=6, every=3, ep_size=2)
    job["optim"] = {"steps": 6, "optimizer": "rmsprop", "lr": 0.003, "weight_decay": 1e-4,
                    "schedule": "cosine", "warmup_steps": 2, "min_lr": 1e-4, "label_smoothing": 0.1,
                    "ema": {"enabled": True, "decay": 0.8}}
    job["metrics"]["eval_every"] = 3
    full = run_workers(job_file(job, "full"), 2, tmp_path / "full.json", timeout=600)
    assert full["step"] == 6 and full["losses"][6] < full["losses"][1]
    ckpts = list_checkpoints(tmp_path / "runs" / "full" / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000006"]
    one_job = {**job, "model": {**job["model"], "ep_size": 1}}
    one = run_workers(job_file(one_job, "one"), 1, tmp_path / "one.json", resume=str(ckpts[0]), timeout=600)
    assert sorted(one["losses"]) == [4, 5, 6]
    for s in (4, 5, 6):
        assert one["losses"][s] == pytest.approx(full["losses"][s], rel=1e-4), s
    a = torch.load(ckpts[1] / "ema.pt", weights_only=True)
    b = torch.load(list_checkpoints(tmp_path / "runs" / "one" / "checkpoints")[-1] / "ema.pt", weights_only=True)
    assert a["weights"].keys() == b["weights"].keys()
    assert any("deepspeed_experts.3." in n for n in a["weights"])  # both ranks' experts, global ids
    for n in a["weights"]:
        assert torch.allclose(a["weights"][n], b["weights"][n], rtol=1e-4, atol=1e-6), n
    # the same topology: DeepSpeed's own sharded load (RMSpropTF state in ZeRO 2's files), ema.pt
    two = run_workers(job_file(job, "two"), 2, tmp_path / "two.json", resume=str(ckpts[0]), timeout=600)
    for s in (4, 5, 6):
        assert two["losses"][s] == pytest.approx(full["losses"][s], rel=1e-5), s
    c = torch.load(list_checkpoints(tmp_path / "runs" / "two" / "checkpoints")[-1] / "ema.pt", weights_only=True)
    assert all(torch.allclose(a["weights"][n], c["weights"][n], rtol=1e-5, atol=1e-7) for n in a["weights"])
    evals = [json.loads(x) for x in (tmp_path / "runs" / "full" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "eval"]
    assert [e["ema"] for e in evals] == [True, True]
    # condmoe eval of the checkpoint evaluates its EMA too, on one process (ep 2 -> 1)
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import tiny_models; "
            "from condmoe.trainer import evaluate_checkpoint; "
            "print(json.dumps(evaluate_checkpoint(sys.argv[2], max_batches=1)))")
    p = subprocess.run([sys.executable, "-c", code, str(HERE), str(ckpts[1])], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["ema"] is True and 0.0 <= res["eval_accuracy"] <= 1.0 and res["eval_samples"] == 128


def test_readme_recipe_example_validates():
    text = (HERE.parents[1] / "README.md").read_text()
    block = next(b.split("```")[0] for b in text.split("```yaml")[1:] if "optim:" in b)
    import yaml

    cfg = job_from_dict(_job(yaml.safe_load(block)["optim"]))
    assert cfg.optim.optimizer == "rmsprop" and cfg.optim.ema.enabled and cfg.optim.schedule == "cosine"
