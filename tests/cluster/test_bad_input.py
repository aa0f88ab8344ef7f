"""Bad input to `condmoe train` / `submit`: one clear line, non-zero exit, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest

from condmoe.cluster.cli import main

JOB = Path(__file__).resolve().parents[2] / "configs" / "condconv.yaml"


def _run(argv, capsys) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture
def no_ray():
    import ray

    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "a bad input started Ray"


@pytest.mark.parametrize("case", ["malformed", "unknown_key", "wrong_type", "missing_data", "unreachable",
                                  "missing_file", "bad_resume", "bad_override"])
def test_bad_input_one_line_nonzero(case, tmp_path, fmnist_shards, capsys, no_ray):
    storage = f"cluster.storage_path={tmp_path / 'runs'}"
    ok_data = f"data.path={fmnist_shards}"
    if case == "malformed":
        bad = tmp_path / "bad.yaml"
        bad.write_text("model: {name: condconv_cnn\ndata: [\n")
        argv, expect = ["train", str(bad)], "malformed YAML"
    elif case == "unknown_key":
        argv, expect = ["train", str(JOB), "--set", "optim.learning_rate=0.1"], "unknown key 'optim.learning_rate'"
    elif case == "wrong_type":
        argv, expect = ["train", str(JOB), "--set", "optim.steps=lots"], "optim.steps"
    elif case == "missing_data":
        argv, expect = ["train", str(JOB), "--set", f"data.path={tmp_path / 'nope'}"], "does not exist"
    elif case == "unreachable":
        argv, expect = ["train", str(JOB), "--set", ok_data, "--address", "127.0.0.1:9"], "unreachable"
    elif case == "missing_file":
        argv, expect = ["train", str(tmp_path / "none.yaml")], "not found"
    elif case == "bad_resume":
        argv, expect = ["train", str(JOB), "--set", ok_data, "--resume", str(tmp_path)], "no complete checkpoint"
    else:
        argv, expect = ["train", str(JOB), "--set", "optim.lr"], "KEY.PATH=VALUE"
    argv += ["--set", storage] if case != "bad_override" else []
    rc, err = _run(argv, capsys)
    assert rc != 0
    assert expect in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_submit_unreachable(capsys, no_ray):
    rc, err = _run(["submit", str(JOB), "--address", "http://127.0.0.1:9"], capsys)
    assert rc != 0 and "127.0.0.1:9" in err and len(err.splitlines()) == 1, err


def test_check_data_checks_only_one_local_path(tmp_path, fmnist_shards):
    from condmoe.cluster.launch import check_data
    from condmoe.trainer.config import job_from_dict

    def job(data_path: str):
        return job_from_dict({"model": {"name": "condconv_cnn"}, "data": {"path": data_path}})

    # s3:// data is checked against its endpoint (tests/cluster/test_s3.py, on the local S3 server)
    for ok in (str(fmnist_shards), f"file://{fmnist_shards}", f"pipe:cat {tmp_path}/nope-000000.tar",
               f"{tmp_path}/nope-{{000000..000001}}.tar"):
        check_data(job(ok))  # shards that are not one local path are the workers' to open
    for missing in (str(tmp_path / "nope"), f"file://{tmp_path}/nope"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_data(job(missing))
    with pytest.raises(FileNotFoundError, match="no manifest.parquet"):
        check_data(job(str(tmp_path)))
