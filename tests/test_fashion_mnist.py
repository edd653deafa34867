"""Fashion-MNIST: IDX parsing, `shards build --source idx`, and builtin://fashion-mnist (on a fixture written
here, and on the real files Debian's dataset-fashion-mnist installs)."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_cluster.data import DataError, load_manifest
from kd_cluster.data.writer import build_idx, read_idx

REAL = Path("/usr/share/datasets/fashion-mnist")
JOBS = Path(__file__).resolve().parent.parent / "jobs" / "fashion_mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 00 00 08 <ndim>, big-endian sizes, data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train: int = 36, n_test: int = 12, *, gz: bool = True, seed: int = 0) -> dict:
    """A tiny IDX set (28x28, 10 classes) as the MNIST family ships it; returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        arrays[part] = (x, y)
        for kind, a, nd in (("images", x, 3), ("labels", y, 1)):
            data = idx_bytes(a)
            name = f"{part}-{kind}-idx{nd}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return arrays


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_cluster.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def decoded(manifest_url: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a split, read back from its shards in stable-index order."""
    import tarfile

    m = load_manifest(manifest_url)
    images, labels = {}, {}
    for shard in m.shards:
        with tarfile.open(shard.url) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                data = tf.extractfile(member).read()
                if ext == "png":
                    images[int(key)] = np.asarray(Image.open(io.BytesIO(data)))
                elif ext == "cls":
                    labels[int(key)] = int(data)
    order = sorted(images)
    return np.stack([images[i] for i in order]), np.array([labels[i] for i in order])


def test_read_idx_round_trip_and_bad_files() -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(idx_bytes(a), "x"), a)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(b"\x89PNG....", "f.png")
    with pytest.raises(DataError, match="element type 0x0d"):
        read_idx(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0", "floats")
    with pytest.raises(DataError, match="2x3x4 = 24 bytes of data, the file holds 23"):
        read_idx(idx_bytes(a)[:-1], "short")
    with pytest.raises(DataError, match="ends at"):
        read_idx(bytes([0, 0, 8, 3, 0, 0]), "header")


@pytest.mark.parametrize("gz", [True, False])
def test_shards_build_idx_end_to_end(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path / "idx", gz=gz)
    r = cli("shards", "build", "--source", "idx", "--root", str(tmp_path / "idx"), "--out", str(tmp_path / "out"),
            "--shard-size", "10")
    assert r.returncode == 0, r.stderr
    train, val = load_manifest(str(tmp_path / "out" / "train")), load_manifest(str(tmp_path / "out" / "val"))
    assert (train.num_samples, val.num_samples, len(train.shards), train.channels) == (36, 12, 4, 1)
    assert not (tmp_path / "out" / "test").exists()
    for split, part in (("train", "train"), ("val", "t10k")):
        x, y = decoded(str(tmp_path / "out" / split))
        np.testing.assert_array_equal(x, arrays[part][0])  # lossless, in file order
        np.testing.assert_array_equal(y, arrays[part][1])


def test_idx_holdout_carves_val_from_the_end_of_train(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "idx")
    ms = build_idx(str(tmp_path / "idx"), str(tmp_path / "out"), holdout=6, shard_size=50, progress=False)
    assert {k: m.num_samples for k, m in ms.items()} == {"train": 30, "val": 6, "test": 12}
    x, _ = decoded(str(tmp_path / "out" / "val"))
    np.testing.assert_array_equal(x, arrays["train"][0][30:])
    x, _ = decoded(str(tmp_path / "out" / "test"))
    np.testing.assert_array_equal(x, arrays["t10k"][0])


def test_idx_heads_are_the_first_training_images(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "idx")
    ms = build_idx(str(tmp_path / "idx"), str(tmp_path / "out"), holdout=6, shard_size=50, progress=False,
                   heads={"train10": 10})
    assert {k: m.num_samples for k, m in ms.items()} == {"train": 30, "val": 6, "test": 12, "train10": 10}
    x, y = decoded(str(tmp_path / "out" / "train10"))
    np.testing.assert_array_equal(x, arrays["train"][0][:10])
    np.testing.assert_array_equal(y, arrays["train"][1][:10])
    for heads, needle in (({"train40": 31}, "holds 30"), ({"val": 3}, "already exists"), ({"none": 0}, "first 0")):
        with pytest.raises(DataError, match=needle):
            build_idx(str(tmp_path / "idx"), str(tmp_path / f"bad{len(needle)}"), holdout=6, progress=False, heads=heads)


def test_idx_errors_are_one_line(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "idx", gz=False)
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    r = cli("shards", "build", "--source", "idx", "--root", str(tmp_path / "idx"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "12 images but" in r.stderr and "11 labels" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").unlink()
    r = cli("shards", "build", "--source", "idx", "--root", str(tmp_path / "idx"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "t10k-labels-idx1-ubyte" in r.stderr and "missing" in r.stderr
    r = cli("shards", "build", "--source", "mnist5k", "--holdout", "5", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--source idx" in r.stderr
    with pytest.raises(DataError, match="holdout"):
        write_idx_set(tmp_path / "idx2")
        build_idx(str(tmp_path / "idx2"), str(tmp_path / "o2"), holdout=36, progress=False)


def test_builtin_fashion_mnist_from_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_idx_set(tmp_path / "fm", n_train=48)
    monkeypatch.setenv("KD_CLUSTER_FASHION_MNIST", str(tmp_path / "fm"))
    monkeypatch.setenv("KD_CLUSTER_CACHE", str(tmp_path / "cache"))
    train = load_manifest("builtin://fashion-mnist/train")
    val = load_manifest("builtin://fashion-mnist/val")
    test = load_manifest("builtin://fashion-mnist/test")
    assert (train.num_samples, val.num_samples, test.num_samples) == (44, 4, 12)  # val: the last twelfth
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    x, _ = decoded(val.url)
    np.testing.assert_array_equal(x, arrays["train"][0][44:])
    # train500: the first 500 of train; a fixture smaller than that gives all of its train split
    x, y = decoded(load_manifest("builtin://fashion-mnist/train500").url)
    np.testing.assert_array_equal(x, arrays["train"][0][:44])
    np.testing.assert_array_equal(y, arrays["train"][1][:44])
    # another source folder gets its own cache entry, never the first one's shards
    write_idx_set(tmp_path / "fm2", n_train=24)
    monkeypatch.setenv("KD_CLUSTER_FASHION_MNIST", str(tmp_path / "fm2"))
    assert load_manifest("builtin://fashion-mnist/train").num_samples == 22
    with pytest.raises(DataError, match="expected builtin://<name>/<split>"):
        load_manifest("builtin://mnist5k/test")


def test_missing_fashion_mnist_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    job = str(JOBS / "scratch.yaml")
    env = {"KD_CLUSTER_FASHION_MNIST": str(tmp_path / "nowhere"), "KD_CLUSTER_CACHE": str(tmp_path / "cache")}
    for cmd in (("validate", job), ("run", job, "--no-ray", f"storage.path={runs}", "telemetry.wandb_mode=disabled")):
        r = cli(*cmd, env=env)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert "dataset-fashion-mnist" in line and "KD_CLUSTER_FASHION_MNIST" in line and "nowhere" in line, line
    assert not runs.exists()  # nothing started, no run folder written
    assert not any((tmp_path / "cache").glob("fashion-mnist*"))


def test_real_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real 70,000 images (Debian's dataset-fashion-mnist; .ci/run installs it). Under CI=true a missing
    dataset fails this test instead of skipping it."""
    if not any(REAL.glob("train-images-idx3-ubyte*")):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{REAL}: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
        pytest.skip(f"{REAL}: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.delenv("KD_CLUSTER_FASHION_MNIST", raising=False)
    sizes = {s: load_manifest(f"builtin://fashion-mnist/{s}").num_samples for s in ("train", "val", "test", "train500")}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000, "train500": 500}
    x, y = decoded(load_manifest("builtin://fashion-mnist/val").url)
    assert x.shape == (5000, 28, 28) and sorted(set(y.tolist())) == list(range(10))
