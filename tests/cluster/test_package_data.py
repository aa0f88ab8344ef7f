"""A non-editable install (a wheel, as deploy/Dockerfile installs condmoe) ships the job files.

The wheel is built from a copy of the sources, installed into a fresh virtual
environment that sees this one's dependencies but not its editable condmoe, and
used from a folder without any sources: `condmoe demo`'s default job and
`condmoe:NAME` must resolve inside the installed package.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "condmoe", "routing", "datasets", "trainer", "cluster", "configs"]

CHECK = """
import json, sys
import condmoe, condmoe.configs
from condmoe.cluster.cli import build_parser, resolve_job, shipped_jobs
from condmoe.trainer.config import load_job
job = build_parser().parse_args(["demo"]).job
path = resolve_job(job)
cfg = load_job(path)
print(json.dumps({"package": condmoe.__file__, "default": job, "path": path, "model": cfg.model.name,
                  "shipped": sorted(shipped_jobs()), "editable": [str(m) for m in sys.meta_path if "editable" in str(m)]}))
"""


@pytest.mark.slow
def test_wheel_ships_the_job_files_and_demo_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("condmoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    jobs = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert jobs and {f"condmoe/configs/{j}" for j in jobs} <= names

    # a fresh environment: this one's dependencies through a .pth, not its editable condmoe finder
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"  # no configs/, no sources
    elsewhere.mkdir()
    res = subprocess.run([str(python), "-c", CHECK], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["editable"] == [] and out["package"].startswith(str(site))
    assert out["default"] == "condmoe:condconv" and out["path"] == str(site / "condmoe" / "configs" / "condconv.yaml")
    assert out["model"] == "condconv_cnn" and out["shipped"] == sorted(Path(j).stem for j in jobs)
