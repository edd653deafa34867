"""deploy/: every manifest parses and has what a cluster needs; job files they run exist and validate; no
credential values anywhere in the repository; the dashboard / Jobs API port is never exposed publicly."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd_cluster.config import load_job

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
YAMLS = sorted(DEPLOY.rglob("*.yaml"))
SKIP_DIRS = {".git", ".venv", "__pycache__", "runs", ".kd_cluster", "wandb", ".pytest_cache", "node_modules"}
DASHBOARD_PORT = 8265

# Credential shapes: AWS access key ids, 40-character secrets assigned to a key-like name, W&B API keys
# (40 hex), private keys, literal passwords / tokens in YAML or env files.
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}\b"),
    "W&B API key": re.compile(r"(?i)wandb_api_key\s*[:=]\s*['\"]?[0-9a-f]{40}\b"),
    "bare 40-hex key": re.compile(r"(?i)\b(?:api_?key|token)\s*[:=]\s*['\"]?[0-9a-f]{40}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "literal password": re.compile(r"(?i)\bpassword\s*:\s*['\"]?(?!\s|$|\{\{|['\"]?\$)[^\s'\"]{4,}"),
}


def docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in YAMLS for d in docs(p) if isinstance(d, dict) and d.get("kind") == kind]


def walk(node: Any, path: str = "") -> Any:
    """Every (dotted path, value) pair of a parsed document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    yield path, node


def scan_for_secrets(text: str) -> list[str]:
    return [name for name, rx in SECRET_PATTERNS.items() if rx.search(text)]


def test_deploy_has_the_expected_files_and_every_yaml_parses() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert {"Dockerfile", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "aws/cluster.yaml"} <= names
    for p in YAMLS:
        assert docs(p), f"{p} is empty"


def test_dockerfile_pins_ray_and_installs_with_the_ci_constraints() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    pins = dict(ln.split("==") for ln in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
                if "==" in ln and not ln.startswith("#"))
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1) == f"rayproject/ray:{pins['ray']}-py311-gpu"
    assert "FROM ${RAY_IMAGE}" in text and ":latest" not in text
    assert re.search(r"pip install .*-c \.ci/constraints\.txt \.", text)


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    out = [(f"{p.name} RayCluster", d["spec"]) for p, d in by_kind("RayCluster")]
    out += [(f"{p.name} RayJob", d["spec"]["rayClusterSpec"]) for p, d in by_kind("RayJob")]
    return out


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def test_raycluster_has_cpu_head_student_and_teacher_gpu_groups_on_spot_nodes() -> None:
    specs = _cluster_specs()
    assert specs, "no RayCluster / RayJob manifests"
    for where, spec in specs:
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        for c in _containers(head["template"]):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), f"{where}: the head is a CPU node"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        for name, resource in (("student-gpu", "student"), ("teacher-gpu", "teacher")):
            g = groups[name]
            assert json.loads(json.loads(g["rayStartParams"]["resources"])) == {resource: 1}, (where, name)
            assert g["rayStartParams"]["num-gpus"] == "1"
            for c in _containers(g["template"]):
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", (where, name)
                assert ":latest" not in c["image"] and ":" in c["image"]
            pod = g["template"]["spec"]
            assert pod["nodeSelector"] == {"eks.amazonaws.com/capacityType": "SPOT"}, (where, name)
            assert any(t["key"] == "kd-cluster/spot" for t in pod["tolerations"])
            assert g["template"]["metadata"]["labels"]["kd-cluster/role"] == resource


def test_credentials_only_from_kubernetes_secrets() -> None:
    for where, spec in _cluster_specs():
        templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
        for t in templates:
            for c in _containers(t):
                env = {e["name"]: e for e in c.get("env", [])}
                assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"} <= set(env), where
                for name, e in env.items():
                    if re.search(r"KEY|SECRET|TOKEN|PASSWORD", name):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], (where, name)


def test_rayjob_retries_a_lost_cluster_and_runs_a_job_file_that_validates() -> None:
    jobs = by_kind("RayJob")
    assert jobs
    cluster = {p.name: d for p, d in by_kind("RayCluster")}
    for p, d in jobs:
        spec = d["spec"]
        assert spec["backoffLimit"] >= 1, p
        # the job's cluster is the one raycluster.yaml describes (one source of truth for both)
        assert spec["rayClusterSpec"] == cluster["raycluster.yaml"]["spec"], p
        words = shlex.split(spec["entrypoint"])
        assert words[:2] == ["kd-cluster", "run"], p
        assert words[2].startswith("/opt/kd_cluster/jobs/"), "job files are baked into the image at /opt/kd_cluster"
        job = ROOT / "jobs" / words[2].removeprefix("/opt/kd_cluster/jobs/")
        assert job.is_file(), f"{p}: {job} does not exist"
        overrides = words[3:]
        assert any(o.startswith("name=") for o in overrides) and any(o.startswith("storage.path=s3://")
                                                                     for o in overrides), \
            "a fixed run name and shared storage: every retry resumes the same run"
        jspec = load_job(job, overrides)
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        student = next(g for g in workers if g["groupName"] == "student-gpu")
        cpu = float(_containers(student["template"])[0]["resources"]["limits"]["cpu"])
        assert jspec.resources.use_gpu and jspec.resources.num_workers <= student["maxReplicas"]
        assert jspec.resources.cpus_per_worker <= cpu, "a Ray Train worker must fit on one student pod"


def test_launcher_uses_spot_workers_and_keeps_the_dashboard_private() -> None:
    cfg = docs(DEPLOY / "aws" / "cluster.yaml")[0]
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert {"student", "teacher"} == {next(iter(v["resources"])) for v in workers.values()}
    for v in workers.values():
        assert v["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for perm in cfg["provider"]["security_group"]["IpPermissions"]:
        ranges = [r["CidrIp"] for r in perm.get("IpRanges", [])]
        assert "0.0.0.0/0" not in ranges, "no rule open to the whole internet"
        assert not perm["FromPort"] <= DASHBOARD_PORT <= perm["ToPort"], "the dashboard port has no ingress rule"
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd and "0.0.0.0" not in head_cmd


def test_no_manifest_exposes_the_dashboard_publicly() -> None:
    for p in YAMLS:
        for d in docs(p):
            assert d.get("kind") not in ("Ingress", "Gateway", "HTTPRoute"), p
            for path, value in walk(d):
                if path.endswith("serviceType") or (path.endswith(".type") and d.get("kind") == "Service"):
                    assert value not in ("LoadBalancer", "NodePort"), (p, path)
                if path.endswith("nodePort") or path.endswith("hostPort"):
                    raise AssertionError(f"{p}: {path} publishes a port on the node")
                if "IpRanges" in path and isinstance(value, str):
                    assert value != "0.0.0.0/0", (p, path)


def _repo_text_files() -> list[Path]:
    out = []
    for p in ROOT.rglob("*"):
        if any(part in SKIP_DIRS for part in p.relative_to(ROOT).parts) or not p.is_file():
            continue
        if p.suffix in {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg", ".json", ".env", ".sh", ""} \
                and p.stat().st_size < 1_000_000:
            out.append(p)
    return out


def test_no_credential_value_in_any_file() -> None:
    files = _repo_text_files()
    assert any(p.name == "raycluster.yaml" for p in files) and any(p.name == "README.md" for p in files)
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := scan_for_secrets(p.read_text(errors="replace")))}
    assert not found, found


@pytest.mark.parametrize("planted", [
    "AKIA" + "Q3EXAMPLE7KD2XWZ",
    "AWS_SECRET_ACCESS_KEY=" + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
    "WANDB_API_KEY: " + "0123456789abcdef" * 2 + "01234567",
    "password: " + "hunter22",
    "-----BEGIN RSA " + "PRIVATE KEY-----",
])
def test_the_secret_scan_finds_planted_credentials(planted: str) -> None:
    assert scan_for_secrets(f"env:\n  - {planted}\n")


@pytest.mark.parametrize("fine", ["valueFrom: {secretKeyRef: {name: kd-cluster-s3, key: AWS_SECRET_ACCESS_KEY}}",
                                  "password: {{ .Values.password }}", "export AWS_SECRET_ACCESS_KEY=..."])
def test_the_secret_scan_passes_references(fine: str) -> None:
    assert not scan_for_secrets(fine)
