"""Shared fixtures: one builtin-data cache and one local Ray cluster per test session."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's Ray cluster run last (in file order), so that every test that forks loader
    processes in this process does so before it becomes a Ray driver (with gRPC threads and handles)."""
    items.sort(key=lambda item: "ray_cluster" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All builtin datasets of the session go to one temporary cache (set before Ray starts)."""
    d = tmp_path_factory.mktemp("kdc-cache")
    os.environ["KD_CLUSTER_CACHE"] = str(d)
    return d


class S3Server:
    """A moto S3 server on 127.0.0.1 (never any other address)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options for this server."""
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def bucket(self, name: str) -> str:
        """Create a bucket if needed; returns its s3:// URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One local S3 server per session; credentials for it in the environment, as users would set them."""
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(builtin_cache: Path, s3: S3Server) -> Iterator[str]:
    """One local Ray instance for every Ray test of the session; yields its GCS address.

    Started after the S3 server, so its workers see the S3 credentials as users' workers would.
    """
    import ray

    from kd_cluster.cluster.local_ray import start_local_ray

    ctx = start_local_ray(num_cpus=4)  # as `kd-cluster run` starts its own
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def _ray_train_worker_pids() -> list[int]:
    """Ray Train worker processes of this session's cluster (their environment has this session's cache)."""
    mark = f"KD_CLUSTER_CACHE={os.environ['KD_CLUSTER_CACHE']}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                if cmd.startswith("ray::RayTrainWorker") and mark in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def ray_train_worker_pids() -> Any:
    """A function listing the pids of the session cluster's Ray Train worker processes (Linux /proc)."""
    return _ray_train_worker_pids


# A line that Ray's log monitor forwards to a driver's stderr: "(raylet) ..." or "(Actor pid=12, ip=...) ...",
# coloured or not. The test session is itself a Ray driver, so these can land in any in-process capture.
_RAY_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:raylet|[^)]*\bpid=\d+[^)]*)\)")


@pytest.fixture
def own_output() -> Any:
    """A filter: what a command itself wrote (stdout or stderr), without the lines Ray forwards from the cluster."""

    def own(text: str) -> str:
        return "".join(line for line in text.splitlines(keepends=True) if not _RAY_FORWARDED.match(line))

    return own


TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "teacher": {"arch": "cnn_s", "weights": "stage:teacher"},
    "student": {"arch": "cnn_xs"},
    "method": {"name": "funmatch"},
    "data": {"train": "builtin://mnist5k/train", "val": "builtin://mnist5k/val", "image_size": 28,
             "batch_size": 32, "loader_workers": 1},
    "augment": {"crop_scale": [0.5, 1.0], "flip": False, "mixup_alpha": 1.0, "eval_resize_ratio": 1.0},
    "schedule": {"steps": 8, "warmup_steps": 2, "log_every": 2, "eval_every": 8, "checkpoint_every": 4},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "resources": {"num_workers": 2},
    "telemetry": {"wandb_mode": "disabled", "progress": True},
    "stages": [
        {"name": "teacher", "trains": "teacher",
         "set": {"method": {"name": "supervised"}, "augment": {"mixup_alpha": 0.0}, "schedule": {"steps": 6}}},
        {"name": "distill"},
    ],
}


@pytest.fixture
def tiny_job(tmp_path: Path) -> Any:
    """Write a tiny mnist5k job (storage and telemetry under tmp_path); returns a writer taking section updates."""

    def write(name: str = "tiny", **sections: Any) -> Path:
        d = copy.deepcopy(TINY)
        d["name"] = name
        d["storage"] = {"path": str(tmp_path / "runs")}
        d["telemetry"]["wandb_dir"] = str(tmp_path / "tel" / "wandb")
        for k, v in sections.items():
            if isinstance(v, dict) and isinstance(d.get(k), dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(d))
        return p

    return write
