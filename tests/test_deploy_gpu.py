"""deploy/'s GPU files: a CUDA image beside the CPU one, KubeRay and cluster-launcher GPU worker groups
whose job sets use_gpu (checked like the CPU manifests in tests/monitoring/test_deploy.py)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _sets(entrypoint: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"--set\s+(\S+?)=(\S+)", entrypoint))


def test_gpu_dockerfile_is_the_ray_gpu_image_with_cuda_torch():
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    assert text.startswith("# ") and "rayproject/ray:2.60.0-py311-gpu" in text
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert "ARG TORCH_CUDA=cu" in text and "torch.version.cuda" in text  # the build fails on a CPU wheel
    assert "DS_ACCELERATOR" not in [line.split("=")[0].strip() for line in text.splitlines()
                                    if line.startswith("ENV")]  # the job decides the accelerator
    assert "condmoe-*.whl" in text and "EXPOSE" in text and "9108" in text
    cpu = (DEPLOY / "Dockerfile").read_text()
    assert "py311-cpu" in cpu and "whl/cpu" in cpu  # the CPU image stays CPU


def test_kuberay_rayjob_has_a_gpu_worker_group_and_a_use_gpu_job():
    (job,) = [d for d in _docs(DEPLOY / "kuberay/rayjob-gpu.yaml") if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    sets = _sets(job["spec"]["entrypoint"])
    assert job["spec"]["entrypoint"].startswith("condmoe train ")
    assert sets["cluster.use_gpu"] == "true" and sets["metrics.prometheus.host"] == "0.0.0.0"
    workers = int(sets["cluster.workers"])
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    (hc,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in str(hc.get("resources"))  # the driver needs no GPU
    henv = {e["name"]: e for e in hc["env"]}
    assert henv["RAY_AUTH_MODE"]["value"] == "token" and henv["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    assert {p["name"] for p in hc["ports"]} >= {"gcs-server", "dashboard", "client", "metrics", "condmoe-metrics"}
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["minReplicas"] >= workers  # condmoe's GPU check sees the GPUs at the start
    (wc,) = group["template"]["spec"]["containers"]
    res = wc["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 == int(group["rayStartParams"]["num-gpus"])
    assert wc["image"] == hc["image"] and wc["image"].endswith("-gpu")
    wenv = {e["name"]: e for e in wc["env"]}
    assert "DS_ACCELERATOR" not in wenv  # condmoe sets cuda per worker from use_gpu
    assert wenv["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
        henv["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    assert "/mnt/condmoe" in {m["mountPath"] for m in wc["volumeMounts"]}
    assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])


def test_cluster_launcher_gpu_yaml():
    text = (DEPLOY / "ray-cluster-gpu.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["cluster_name"] and cfg["provider"]["type"]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"].endswith("-gpu") and "--gpus all" in cfg["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert not any("DS_ACCELERATOR" in o for o in cfg["docker"]["run_options"])
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_nodes = {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_nodes and all("node_config" in t for t in gpu_nodes.values())
    assert sum(t["min_workers"] for t in gpu_nodes.values()) >= 2
    assert "ray start --head" in " ".join(cfg["head_start_ray_commands"])
    # the documented job sets use_gpu
    assert "condmoe submit" in text and "--set cluster.use_gpu=true" in text
