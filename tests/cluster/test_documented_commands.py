"""The condmoe commands shown to users run as written.

They are extracted, never copied: the shell blocks of README.md and docs/*.md,
the comments of configs/*.yaml and deploy/ (plus RayJob entrypoints) and the hint
in launch.py's missing-data error. Every one must parse with the real parser (a
renamed flag, or a positional that became an option, fails here), every
subcommand's --help runs, and the cheap ones run for real in a scratch folder on
a Fashion-MNIST slice: the shards commands (writes get --limit; generated photos too), README's train
line on configs/coe.yaml with a few tiny overrides on embedded Ray, its resume
line with --json -v, eval, experts and report. Commands that need a running
cluster (submit, status, logs, stop, list) or object storage (s3://) are parsed only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from condmoe.cluster.cli import build_parser, main, resolve_job

ROOT = Path(__file__).resolve().parents[2]
CONDMOE = str(Path(sys.executable).parent / "condmoe")

# `condmoe SUBCOMMAND ...` up to a comment, a shell separator, a closing backtick, quote or parenthesis
_COMMAND = re.compile(r"""(?<![\w./:-])condmoe\s+([a-z]+)\b([^\n`;#|)"]*)""")


def _subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


def _commands_in_text(text: str, where: str) -> list[tuple[str, str]]:
    """[(where, command)] for each `condmoe SUBCOMMAND ...`; [optional] parts are kept, brackets dropped."""
    text = re.sub(r"\\\n\s*#?", " ", text)  # shell line continuations, also inside comment blocks
    known = _subcommands()
    found = []
    for m in _COMMAND.finditer(text):
        if m.group(1) in known:
            cmd = f"condmoe {m.group(1)}{m.group(2)}".replace("[", "").replace("]", "")
            found.append((where, " ".join(cmd.split())))
    return found


def _shell_blocks(markdown: str) -> list[str]:
    """The fenced blocks of a markdown file that hold shell (```bash, ```sh or a bare ```)."""
    blocks, lang, lines = [], None, []
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, lines = line.strip().removeprefix("```").strip(), []
            else:
                if lang in ("", "bash", "sh", "console"):
                    blocks.append("\n".join(lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _entrypoints(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "entrypoint" and isinstance(v, str)] + \
               [e for v in node.values() for e in _entrypoints(v)]
    if isinstance(node, list):
        return [e for v in node for e in _entrypoints(v)]
    return []


def _launch_hint() -> str:
    """The command launch.py's missing-data error tells the user to run."""
    from condmoe.cluster.launch import check_data
    from condmoe.trainer.config import load_job

    cfg = load_job(ROOT / "configs" / "condconv.yaml", ["data.path=/nonexistent/condmoe-shards"])
    with pytest.raises(FileNotFoundError) as err:
        check_data(cfg)
    return str(err.value)


def documented_commands() -> list[tuple[str, str]]:
    """Every documented command as (file, command), in file order."""
    found = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in _shell_blocks(md.read_text()):
            found += _commands_in_text(block, md.relative_to(ROOT).as_posix())
    for path in [*sorted((ROOT / "configs").glob("*.yaml")), *sorted((ROOT / "deploy").rglob("*.yaml"))]:
        where = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        comments = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if line.lstrip().startswith("#"))
        found += _commands_in_text(comments, where)
        for doc in yaml.safe_load_all(text):
            for entry in _entrypoints(doc):
                found += _commands_in_text(entry, f"{where} (entrypoint)")
    found += _commands_in_text(_launch_hint(), "cluster/launch.py (check_data)")
    return found


COMMANDS = documented_commands()


def _in(where: str) -> list[str]:
    return [cmd for w, cmd in COMMANDS if w == where]


def test_the_commands_are_found():
    """The extraction itself: if a file's commands stop being found, the tests below would check nothing."""
    readme = {shlex.split(c)[1] for c in _in("README.md")}
    assert {"shards", "train", "eval", "submit", "status", "logs", "stop", "list", "experts", "report"} <= readme
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cmds = _in(f"configs/{path.name}")
        if yaml.safe_load(path.read_text())["data"].get("resolution"):  # a photo-path job
            assert "condmoe shards write imagefolder:/path/to/photos data/photos" in cmds, path.name
            assert any(c.startswith("condmoe shards write photolike:") and c.endswith(" data/photos")
                       for c in cmds), path.name
        else:
            assert "condmoe shards write fashion_mnist data/fashion_mnist" in cmds, path.name
        assert f"condmoe train configs/{path.name} --set optim.steps=500" in cmds, path.name
        assert f"condmoe train condmoe:{path.stem}" in cmds, path.name
    assert any(c.startswith("condmoe submit condmoe:condconv") for c in _in("deploy/ray-cluster.yaml"))
    assert any(c.startswith("condmoe shards write fashion_mnist") for c in _in("deploy/kuberay/raycluster.yaml"))
    assert _in("deploy/kuberay/rayjob.yaml (entrypoint)")
    assert _in("cluster/launch.py (check_data)") == ["condmoe shards write fashion_mnist /nonexistent/condmoe-shards"]
    assert _in("docs/datasets.md") and _in("docs/monitoring.md")


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_documented_command_parses(where, cmd, capsys):
    argv = shlex.split(cmd)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `{cmd}` no longer parses: {capsys.readouterr().err.strip()}")
    job = getattr(args, "job", None)
    if args.command in ("train", "submit", "demo") and job:
        path = resolve_job(job)  # condmoe:NAME must name a shipped job
        assert (ROOT / path).is_file() or Path(path).is_file(), f"{where}: `{cmd}`: job file {job} is missing"


def _help_paths() -> list[list[str]]:
    paths = [[]]

    def walk(parser, prefix):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    paths.append([*prefix, name])
                    walk(child, [*prefix, name])

    walk(build_parser(), [])
    return paths


@pytest.mark.parametrize("path", _help_paths(), ids=lambda p: " ".join(p) or "condmoe")
def test_help_runs(path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*path, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: condmoe{' ' if path else ''}{' '.join(path)}")


def test_shipped_job_resolves_and_fails_before_ray(tmp_path, capsys):
    """`condmoe train condmoe:coe` loads the shipped file; a missing data folder names the fix, Ray never starts."""
    import ray

    rc = main(["train", "condmoe:coe", "--set", f"data.path={tmp_path / 'none'}",
               "--set", f"cluster.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "does not exist" in err, err
    assert f"condmoe shards write fashion_mnist {tmp_path / 'none'}" in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# a few steps of a tiny model: the documented syntax is what is under test, not the training
TINY = ["--set", "model.size=tiny", "--set", "optim.steps=2", "--set", "optim.warmup_steps=0",
        "--set", "data.batch_size=32", "--set", "data.eval_batch_size=128", "--set", "checkpoint.every=2",
        "--set", "metrics.log_every=1", "--set", "metrics.eval_every=2", "--set", "metrics.eval_batches=1"]
SHARD_SLICE = ["--limit", "640", "--samples-per-shard", "128", "--no-progress"]
PHOTO_SLICE = ["--limit", "40", "--samples-per-shard", "16", "--no-progress"]  # generated JPEGs: ~50 ms each


def _run(cmd: str, extra: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    argv = [CONDMOE, *shlex.split(cmd)[1:], *extra]
    env = {**os.environ, "COLUMNS": "200", "DS_ACCELERATOR": "cpu"}
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"`{cmd}` {' '.join(extra)} failed ({res.returncode}):\n" \
                                f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(2400)
def test_documented_commands_run(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the commands are written for the repo root
    readme = _in("README.md")

    # the shards commands of README and docs/, in order, for the sources every machine has (writes on
    # a small slice; photo folders and foreign shard sets are parsed only)
    shards = [shlex.split(c) for w, c in COMMANDS if w.endswith(".md") and c.startswith("condmoe shards")]
    written: set[str] = set()
    ran: set[str] = set()
    for argv in {" ".join(a): a for a in shards}.values():
        action, target = argv[2], argv[3]
        if any("://" in a for a in argv[3:]):  # object storage (README's S3 part): parsed only, like the cluster commands
            continue
        if action == "write" and target.split(":")[0] in ("fashion_mnist", "digits", "synthetic", "photolike"):
            _run(shlex.join(argv), PHOTO_SLICE if target.startswith("photolike:") else SHARD_SLICE, tmp_path)
            written.add(argv[4])
            ran.add(action)
        elif action in ("verify", "inspect") and target in written:
            res = _run(shlex.join(argv), [], tmp_path)
            ran.add(action)
            if action == "verify":
                assert res.stdout.startswith("OK: checked"), res.stdout
            else:
                assert "train" in res.stdout and "test" in res.stdout
    assert ran == {"write", "verify", "inspect"} and {"data/fashion_mnist", "data/fmnist"} <= written
    # the photo-path jobs' line for generated photos (configs/ headers), when README did not run it
    for cmd in sorted({c for w, c in COMMANDS if w.startswith("configs/") and " photolike:" in c}):
        out = shlex.split(cmd)[4]
        if out not in written:
            _run(cmd, PHOTO_SLICE, tmp_path)
            written.add(out)
        assert (tmp_path / out / "manifest.parquet").is_file(), cmd

    # README: train (quiet: no Ray Train line per report), resume with --json -v, eval
    (train,) = [c for c in readme if c.startswith("condmoe train configs/") and "--resume" not in c]
    res = _run(train, TINY, tmp_path)
    assert "checkpoint:" in res.stdout
    assert "TrainingReport(" not in res.stdout + res.stderr, "Ray Train's per-report lines reach the terminal"

    (resume,) = [c for c in readme if c.startswith("condmoe train configs/") and "--resume" in c]
    res = _run(resume, [*TINY, "--set", "optim.steps=4", "--json", "-v"], tmp_path)
    out = json.loads(res.stdout)  # the JSON document alone on stdout, every log line on stderr
    assert out["metrics"]["step"] == 4 and Path(out["checkpoint"]).is_dir()
    assert "Reporting training result" in res.stderr, "-v should show Ray Train's per-report lines"

    run_dir = Path(out["run_dir"])
    (evaluate,) = [c for c in readme if c.startswith("condmoe eval")]
    res = _run(evaluate, [], tmp_path)
    assert "accuracy:" in res.stdout and "MAdds:" in res.stdout

    # README's monitoring lines name runs/condconv: point it at the run just trained
    (tmp_path / "runs" / "condconv").symlink_to(run_dir)
    for cmd in (c for c in readme if c.startswith(("condmoe experts", "condmoe report"))):
        res = _run(cmd, ["--iterations", "1", "--interval", "0.1"] if "--watch" in cmd else [], tmp_path)
        assert res.stdout.strip()
