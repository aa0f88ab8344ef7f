"""Typed model options: each family's options dataclass, the job's model union, check_model."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import tiny_models  # noqa: F401  (registers test_soft_cnn, a family without options)
from condmoe.routing import BasisNetConfig, CIGTConfig, CoEConfig, TopKMoE, build_model, model_families
from condmoe.routing.models.basisnet_cnn import BasisNetCnnOptions
from condmoe.routing.models.cigt_lenet import CigtLenetOptions
from condmoe.routing.models.coe_cnn import CoECnnOptions
from condmoe.routing.models.topk_moe_cnn import TopKMoeCnnOptions
from condmoe.trainer.config import ConfigError, dump_job, job_from_dict, load_job
from condmoe.trainer.engine import build_model as build_job_model
from condmoe.trainer.engine import check_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
BUILTIN = ("basisnet_cnn", "cigt_lenet", "coe_cnn", "condconv_cnn", "topk_moe_cnn")
FAMILIES = sorted(n for n, f in model_families().items() if f.options is not None)

# a real option per family, a non-default value, and where the built model shows it
APPLIED = {
    "condconv_cnn": ("dropout", 0.2, lambda m: m.dropout.p),
    "basisnet_cnn": ("temperature", 2.5, lambda m: m.config.temperature),
    "coe_cnn": ("lgm", "argmin", lambda m: m.config.lgm),
    "cigt_lenet": ("execution", "dense", lambda m: m.config.execution),
    "topk_moe_cnn": ("k", 2, lambda m: m.moe.k),
    # the ImageNet-scale families
    "basisnet_mobilenet_v3": ("temperature", 2.5, lambda m: m.config.temperature),
    "coe_mobilenet": ("lgm", "argmin", lambda m: m.config.lgm),
    "cigt_resnet": ("execution", "dense", lambda m: m.config.execution),
    "condconv_efficientnet": ("dropout", 0.3, lambda m: _dropout_p(m)),
    "condconv_mobilenet_v1": ("dropout", 0.3, lambda m: _dropout_p(m)),
    "condconv_mobilenet_v2": ("dropout", 0.3, lambda m: _dropout_p(m)),
}


def _dropout_p(model) -> float:
    """The rate of the classifier's dropout (the network's only nn.Dropout)."""
    import torch.nn as nn

    (p,) = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    return p


def _job(model: dict, **sections) -> dict:
    return {"model": model, "data": {"path": "/x", "batch_size": 64}, **sections}


def _float_option(name: str) -> str:
    option = next((f.name for f in dataclasses.fields(model_families()[name].options)
                   if isinstance(f.default, float)), None)
    if option is None:
        pytest.skip(f"{name} has no float option")
    return option


def test_every_builtin_family_declares_options():
    assert set(BUILTIN) <= set(FAMILIES)


@pytest.mark.parametrize("options, config, own", [
    (CoECnnOptions, CoEConfig, {"num_experts", "ep_size"}),
    (BasisNetCnnOptions, BasisNetConfig, {"num_bases"}),
    (CigtLenetOptions, CIGTConfig, set()),
], ids=["coe", "basisnet", "cigt"])
def test_options_cover_the_layer_config_they_forward_to(options, config, own):
    """Every field of the config a builder forwards its options into is an option (or set by the builder)."""
    names = {f.name for f in dataclasses.fields(options)}
    assert {f.name for f in dataclasses.fields(config)} - own <= names


def test_topk_options_cover_topk_moe_keywords():
    import inspect

    params = set(inspect.signature(TopKMoE.__init__).parameters) - {"self", "hidden_size", "expert", "num_experts",
                                                                    "ep_size"}
    assert params == {f.name for f in dataclasses.fields(TopKMoeCnnOptions)}


@pytest.mark.parametrize("name", FAMILIES)
def test_misspelt_option_names_the_field(name):
    with pytest.raises(ConfigError) as e:
        job_from_dict(_job({"name": name, "options": {"no_such_option": 3}}), source="job.yaml")
    assert str(e.value) == "job.yaml: unknown key 'model.options.no_such_option'"
    with pytest.raises(ValueError, match="no option 'no_such_option'"):
        build_model(name, model_families()[name].sizes[0], no_such_option=3)


@pytest.mark.parametrize("name", FAMILIES)
def test_wrong_option_type_names_the_field(name):
    option = _float_option(name)
    with pytest.raises(ConfigError, match=rf"field 'model\.options\.{option}'.*valid number.*'many'") as e:
        job_from_dict(_job({"name": name, "options": {option: "many"}}))
    assert "\n" not in str(e.value)


def test_unknown_model_size_and_ep_size_errors():
    with pytest.raises(ConfigError, match=r"field 'model\.name': unknown model 'nope'; registered: .*coe_cnn"):
        job_from_dict(_job({"name": "nope"}))
    with pytest.raises(ConfigError, match=r"field 'model\.size': Input should be 'tiny', 'small' or 'base'"):
        job_from_dict(_job({"name": "coe_cnn", "size": "huge"}))
    with pytest.raises(ConfigError, match="missing required field 'model.name'"):
        job_from_dict(_job({"size": "small"}))
    with pytest.raises(ConfigError, match=r"field 'model\.ep_size': model 'condconv_cnn' has no expert-parallel"):
        job_from_dict(_job({"name": "condconv_cnn", "ep_size": 2}))


def test_family_without_options_takes_none():
    cfg = job_from_dict(_job({"name": "test_soft_cnn", "size": "tiny"}))
    assert cfg.model.build_kwargs()["options"] is None and not cfg.model.hard_routed
    assert job_from_dict(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ConfigError, match="unknown key 'model.options.dropout'"):
        job_from_dict(_job({"name": "test_soft_cnn", "size": "tiny", "options": {"dropout": 0.1}}))
    with pytest.raises(ValueError, match="takes no options"):
        build_model("test_soft_cnn", "tiny", dropout=0.1)


@pytest.mark.parametrize("name", FAMILIES)
def test_round_trip_through_dump(name):
    option, value, _ = APPLIED[name] if name in APPLIED else (_float_option(name), 0.25, None)
    sizes = model_families()[name].sizes
    cfg = job_from_dict(_job({"name": name, "size": sizes[0], "experts": 4, "options": {option: value}}))
    assert getattr(cfg.model.options, option) == value
    assert isinstance(cfg.model.options, model_families()[name].options)
    assert job_from_dict(cfg.model_dump(mode="json")) == cfg  # how the job travels to Ray workers
    assert job_from_dict(yaml.safe_load(dump_job(cfg))) == cfg  # checkpoints' meta.json / config.yaml
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert cfg.model_dump(mode="json")["model"]["options"][option] == value


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_set_option_reaches_the_built_model(path):
    name = yaml.safe_load(path.read_text())["model"]["name"]
    option, value, read = APPLIED[name]
    small = ["model.size=tiny"] if "tiny" in model_families()[name].sizes else []  # ImageNet nets: one size
    cfg = load_job(path, [f"model.options.{option}={value}", "model.ep_size=1", *small])
    assert getattr(cfg.model.options, option) == value
    assert read(build_job_model(cfg)) == value
    check_model(load_job(path), load_job(path).cluster.workers)  # every shipped job builds


@pytest.mark.parametrize("model, world, match", [
    ({"name": "coe_cnn", "experts": 4, "options": {"lgm": "bogus"}}, 1, "CoE lgm must be one of"),
    ({"name": "topk_moe_cnn", "experts": 4, "options": {"k": 5}}, 1, r"k must be in \[1, num_experts=4\]"),
    ({"name": "cigt_lenet", "experts": 8, "options": {"paths": [1, 4]}}, 1, "experts=8 must equal"),
    ({"name": "basisnet_cnn", "experts": 1}, 1, "num_bases must be >= 2"),
    ({"name": "coe_cnn", "experts": 4, "ep_size": 4}, 2, "ep_size=4 does not divide the worker count 2"),
], ids=["coe-lgm", "topk-k", "cigt-paths", "basisnet-bases", "ep-world"])
def test_check_model_rejects_what_only_the_builder_knows(model, world, match):
    cfg = job_from_dict(_job(model))  # validates: only building (or the world) shows the problem
    with pytest.raises(ConfigError, match=match) as e:
        check_model(cfg, world)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_check_model_builds_every_family_with_its_defaults(name):
    check_model(job_from_dict(_job({"name": name, "size": model_families()[name].sizes[0]})), 1)


def test_check_model_builds_expert_parallel_jobs_without_a_process_group():
    state = torch.random.get_rng_state()
    for name in ("coe_cnn", "topk_moe_cnn"):
        check_model(job_from_dict(_job({"name": name, "experts": 4, "ep_size": 2})), 2)
    assert not torch.distributed.is_initialized()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left as it was


def _condmoe(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    exe = Path(sys.executable).with_name("condmoe")
    t0 = time.monotonic()
    p = subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


@pytest.mark.parametrize("override, needle", [
    ("model.options.no_such_option=3", "unknown key 'model.options.no_such_option'"),
    ("model.options.lgm=bogus", "CoE lgm must be one of"),
], ids=["misspelt", "bad-value"])
def test_cli_rejects_a_bad_option_before_ray_starts(override, needle, tmp_path):
    p, elapsed = _condmoe("train", str(ROOT / "configs" / "coe.yaml"), "--set", override,
                          "--set", f"cluster.storage_path={tmp_path}")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and p.stdout == ""
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("condmoe train: error:"), p.stderr
    assert not (tmp_path / "coe").exists()  # nothing launched: no run directory
    assert elapsed < 45, f"took {elapsed:.1f}s"  # imports (~3 s idle; 2 shared cores here), no Ray start
