"""The kd-cluster command line: shards build, schema, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from kd_cluster.data import load_manifest


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_cluster.cli", *args], capture_output=True, text=True, timeout=300)


def test_shards_build_mnist5k(tmp_path: Path) -> None:
    r = cli("shards", "build", "--source", "mnist5k", "--out", str(tmp_path / "mnist"), "--shard-size", "500")
    assert r.returncode == 0, r.stderr
    train = load_manifest(str(tmp_path / "mnist" / "train"))
    val = load_manifest(str(tmp_path / "mnist" / "val" / "manifest.json"))
    assert (train.num_samples, val.num_samples, len(train.shards)) == (4000, 1000, 8)
    assert train.classes == [str(i) for i in range(10)] and train.channels == 1


def test_shards_build_imagefolder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            d = tmp_path / "tree" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    r = cli("shards", "build", "--source", "imagefolder", "--root", str(tmp_path / "tree"), "--out",
            str(tmp_path / "out"), "--shard-size", "3")
    assert r.returncode == 0, r.stderr
    m = load_manifest(str(tmp_path / "out" / "train"))
    assert m.classes == ["n01440764", "n01443537"] and m.num_samples == 8 and len(m.shards) == 3


def test_shards_build_missing_root_is_a_user_error(tmp_path: Path) -> None:
    r = cli("shards", "build", "--source", "imagefolder", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "none" in r.stderr and "Traceback" not in r.stderr


def test_schema_is_json_with_descriptions() -> None:
    r = cli("schema")
    schema = json.loads(r.stdout)
    assert "student" in schema["properties"] and "Run name" in schema["properties"]["name"]["description"]


def test_run_unknown_job_file_exit_2(tmp_path: Path) -> None:
    r = cli("run", str(tmp_path / "missing.yaml"), "--no-ray")
    assert r.returncode == 2 and "file not found" in r.stderr


def test_shards_build_max_side(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        d = tmp_path / "tree" / split / "c0"
        d.mkdir(parents=True)
        for i, size in enumerate(((500, 375), (100, 80))):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.JPEG")
    r = cli("shards", "build", "--source", "imagefolder", "--root", str(tmp_path / "tree"), "--out",
            str(tmp_path / "out"), "--max-side", "320", "--quality", "80")
    assert r.returncode == 0, r.stderr
    assert load_manifest(str(tmp_path / "out" / "train")).reencode == {"max_side": 320, "quality": 80, "reencoded": 1}
    r = cli("shards", "build", "--source", "mnist5k", "--out", str(tmp_path / "o2"), "--quality", "80")
    assert r.returncode == 2 and "--max-side" in r.stderr and "Traceback" not in r.stderr
