"""deploy/: the manifests parse and carry what KubeRay, the Ray cluster launcher and Prometheus need."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers)
    return containers


def _check_raycluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (c,) = [c for c in _containers(head["template"]) if c["name"] == "ray-head"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {"gcs-server", "dashboard", "client", "metrics", "condmoe-metrics"} <= set(ports)
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/mnt/condmoe" in mounts
    claims = [v["persistentVolumeClaim"]["claimName"] for v in head["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (w,) = _containers(group["template"])
        wenv = {e["name"]: e for e in w["env"]}
        assert wenv["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
            env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
        assert "/mnt/condmoe" in {m["mountPath"] for m in w["volumeMounts"]}


def test_kuberay_raycluster_and_rayjob():
    docs = _docs(DEPLOY / "kuberay/raycluster.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "PersistentVolumeClaim", "Service"} <= set(kinds)
    assert "Secret" not in kinds  # a token is never committed; the file says how to create it
    rc = kinds["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_raycluster_spec(rc["spec"])
    svc = kinds["Service"]
    assert any(p["port"] == 9108 for p in svc["spec"]["ports"])
    jobs = [d for d in _docs(DEPLOY / "kuberay/rayjob.yaml") if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    assert "condmoe train" in job["spec"]["entrypoint"]
    assert "metrics.prometheus.host=0.0.0.0" in job["spec"]["entrypoint"]
    _check_raycluster_spec(job["spec"]["rayClusterSpec"])


def test_ray_cluster_launcher_yaml():
    cfg = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert cfg["cluster_name"] and cfg["provider"]["type"]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "ray start --head" in " ".join(cfg["head_start_ray_commands"])
    assert "-p 9108:9108" in cfg["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    for node in cfg["available_node_types"].values():
        assert "node_config" in node and "resources" in node


def test_prometheus_config_is_valid():
    path = DEPLOY / "prometheus/prometheus.yml"
    cfg = yaml.safe_load(path.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["condmoe"]["honor_labels"] is True  # the exporter's job label must win
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    proc = subprocess.run([promtool, "check", "config", "--syntax-only", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_dashboard_shape():
    dash = json.loads((DEPLOY / "grafana/condmoe-dashboard.json").read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for word in ("expert load", "imbalance", "entropy", "dropped", "early-exit", "throughput", "step time",
                 "data wait", "checkpoints", "restarts"):
        assert word in titles, word
    assert any(p["type"] == "heatmap" and p.get("repeat") == "layer" for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dockerfile_installs_condmoe():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("# ") and "FROM " in text
    assert "pip install" in text and "EXPOSE" in text and "9108" in text


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_parses(path):
    assert _docs(DEPLOY / path)
