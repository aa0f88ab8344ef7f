"""Job files -> validated config tree, overrides, generated DeepSpeed JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from condmoe.trainer.config import ConfigError, deepspeed_config, dump_job, job_from_dict, load_job

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_every_method_has_a_job():
    assert {p.stem for p in CONFIGS} >= {"condconv", "basisnet", "coe", "cigt", "topk_moe"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_validate_and_generate_deepspeed_json(path):
    cfg = load_job(path)
    assert cfg.cluster.name == path.stem
    assert Path(cfg.data.path).is_absolute()
    ds = deepspeed_config(cfg, cfg.cluster.workers)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * cfg.cluster.workers * ds[
        "gradient_accumulation_steps"]
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    if cfg.optim.optimizer == "rmsprop":  # built by condmoe.trainer.optim and handed to DeepSpeed
        assert "optimizer" not in ds
    else:
        assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    # round trip through the resolved dump
    import yaml
    again = job_from_dict(yaml.safe_load(dump_job(cfg)))
    assert again == cfg


def _write(tmp_path, text, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = "model: {name: condconv_cnn}\ndata: {path: /tmp/x}\n"


def test_unknown_key_names_field_and_file(tmp_path):
    p = _write(tmp_path, BASE + "optim: {lr: 0.1, lrr: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_job(p)
    msg = str(e.value)
    assert "optim.lrr" in msg and str(p) in msg and "\n" not in msg


def test_wrong_type_names_field(tmp_path):
    p = _write(tmp_path, BASE + "optim: {steps: many}\n")
    with pytest.raises(ConfigError, match=r"optim\.steps.*many"):
        load_job(p)


def test_missing_section_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing required field 'data'"):
        load_job(_write(tmp_path, "model: {name: condconv_cnn}\n"))
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_job(_write(tmp_path, "model: {name: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.yaml")


def test_overrides(tmp_path):
    p = _write(tmp_path, BASE)
    cfg = load_job(p, ["optim.lr=0.5", "deepspeed.zero_stage=1", "model.options.dropout=0.3",
                       "cluster.address=null", "metrics.eval_batches=2"])
    assert cfg.optim.lr == 0.5 and cfg.deepspeed.zero_stage == 1
    assert cfg.model.options.dropout == 0.3 and cfg.metrics.eval_batches == 2
    with pytest.raises(ConfigError, match="optim.nope"):
        load_job(p, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="unknown key 'model.options.width'"):
        load_job(p, ["model.options.width=3"])  # options are typed per model family
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_job(p, ["optim.lr"])


def test_topology_checks():
    cfg = job_from_dict({"model": {"name": "coe_cnn", "experts": 4, "ep_size": 2},
                         "data": {"path": "/x", "batch_size": 6}})
    with pytest.raises(ConfigError, match="batch_size=6"):
        deepspeed_config(cfg, 4)
    cfg.data.batch_size = 12
    with pytest.raises(ConfigError, match="ep_size=2"):
        cfg.check_topology(3)
    with pytest.raises(ConfigError, match="zero_stage=3"):
        job_from_dict({"model": {"name": "coe_cnn"}, "data": {"path": "/x"},
                       "deepspeed": {"zero_stage": 3}})
    with pytest.raises(ConfigError, match="ep_size=3"):
        job_from_dict({"model": {"name": "coe_cnn", "experts": 4, "ep_size": 3}, "data": {"path": "/x"}})


def test_schedules():
    base = {"model": {"name": "condconv_cnn"}, "data": {"path": "/x"}}
    for sched, ds_type in (("warmup", "WarmupLR"), ("warmup_decay", "WarmupDecayLR")):
        cfg = job_from_dict({**base, "optim": {"schedule": sched, "warmup_steps": 5}})
        assert deepspeed_config(cfg, 1)["scheduler"]["type"] == ds_type
    cfg = job_from_dict({**base, "optim": {"schedule": "constant", "optimizer": "sgd"}})
    ds = deepspeed_config(cfg, 1)
    assert "scheduler" not in ds and ds["optimizer"]["type"] == "SGD"


def test_deepspeed_extra_merges_nested_keys():
    cfg = job_from_dict({"model": {"name": "condconv_cnn"}, "data": {"path": "/x"},
                         "deepspeed": {"zero_stage": 3, "extra": {
                             "zero_optimization": {"stage3_param_persistence_threshold": 0},
                             "gradient_clipping": 0.5}}})
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == cfg.data.batch_size


def test_one_worker_runs_zero_stage_0_unless_asked():
    base = {"model": {"name": "condconv_cnn"}, "data": {"path": "/x", "batch_size": 64}}
    cfg = job_from_dict(base)
    assert cfg.deepspeed.zero_stage == 2
    assert deepspeed_config(cfg, 1)["zero_optimization"]["stage"] == 0
    assert deepspeed_config(cfg, 2)["zero_optimization"]["stage"] == 2
    keep = job_from_dict({**base, "deepspeed": {"zero_on_one_worker": True}})
    assert deepspeed_config(keep, 1)["zero_optimization"]["stage"] == 2
    offload = job_from_dict({**base, "deepspeed": {"extra": {"zero_optimization": {
        "offload_optimizer": {"device": "cpu"}}}}})
    assert deepspeed_config(offload, 1)["zero_optimization"]["stage"] == 2


def test_resolve_paths_makes_only_local_paths_absolute(tmp_path):
    from condmoe.trainer.config import resolve_paths

    def resolved(data_path: str) -> str:
        cfg = job_from_dict({"model": {"name": "condconv_cnn"}, "data": {"path": data_path},
                             "cluster": {"storage_path": "runs"}})
        cfg = resolve_paths(cfg, base=tmp_path)
        assert cfg.cluster.storage_path == str((tmp_path / "runs").resolve())
        return cfg.data.path

    assert resolved("data/fmnist") == str((tmp_path / "data/fmnist").resolve())
    assert resolved("file:data/fmnist") == str((tmp_path / "data/fmnist").resolve())
    for kept in ("/d/fmnist", "file:///d/fmnist", "pipe:cat /d/train-000000.tar", "s3://bucket/fmnist",
                 "data/train-{000000..000009}.tar", "pipe:cat d/train-{000000..000001}.tar"):
        assert resolved(kept) == kept  # pipe: commands used to become <cwd>/pipe:cat ...
