"""Shard writing and reading: ImageNet-layout folders, mnist5k, s3 (moto), manifests, corrupt data."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kd_cluster.data import (
    AugmentParams,
    DataError,
    EvalStream,
    Manifest,
    TrainStream,
    build_imagefolder,
    builtin_names,
    is_builtin,
    load_manifest,
    make_train_loader,
    write_split,
)
from kd_cluster.data.shards import read_shard

CLASSES = ["cat", "dog", "fish"]


def _jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _make_tree(root: Path, n_train: int = 10, n_val: int = 3, val_classes: list[str] = CLASSES) -> Path:
    seed = 0
    for split, n, classes in (("train", n_train, CLASSES), ("val", n_val, val_classes)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                ext = ".JPEG" if i % 2 == 0 else ".jpg"
                (d / f"img{i:03d}{ext}").write_bytes(_jpeg(seed))
                seed += 1
        (root / split / "README.txt").write_text("not a class folder")
        (root / split / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    return root


def _raw_samples(manifest: Manifest, storage_options: dict | None = None) -> list[dict]:
    out = []
    for shard in manifest.shards:
        samples = read_shard(shard, storage_options)
        assert len(samples) == shard.count and all(s is not None for s in samples)
        out.extend(samples)
    return out


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tree(tmp_path_factory.mktemp("tree") / "tiny")


def test_imagefolder_roundtrip(jpeg_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifests = build_imagefolder(str(jpeg_tree), str(out), shard_size=8, seed=3, progress=False)
    train, val = manifests["train"], manifests["val"]

    assert (train.name, train.split, train.classes, train.channels) == ("tiny", "train", CLASSES, 3)
    assert train.num_classes == 3 and train.num_samples == 30 and val.num_samples == 9
    assert [s.count for s in train.shards] == [8, 8, 8, 6]
    assert [s.first_index for s in train.shards] == [0, 8, 16, 24]
    assert train.shards[1].url == str(out / "train" / "train-000001.tar")
    assert train.url == str(out / "train" / "manifest.json")

    # The manifest on disk stores shard URLs relative to itself; every spelling of its location loads the same.
    doc = json.loads((out / "train" / "manifest.json").read_text())
    assert doc["shards"][0] == {"url": "train-000000.tar", "count": 8, "first_index": 0}
    assert load_manifest(str(out / "train")) == train
    assert load_manifest(str(out / "train" / "manifest.json")) == train
    assert load_manifest(f"file://{out}/train") == train  # a file:// URL is the local path (kd_cluster.urls)
    assert not list(out.rglob("*.tmp-*"))

    originals = {
        p.read_bytes(): (p.parent.name, p.parent.parent.name)
        for p in jpeg_tree.rglob("*.*")
        if p.suffix in (".JPEG", ".jpg")
    }
    for m in (train, val):
        samples = _raw_samples(m)
        assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(m.num_samples)]
        assert [int(s["idx"]) for s in samples] == list(range(m.num_samples))
        for s in samples:
            cls_name, split = originals[s["jpg"]]  # bytes copied as they are
            assert split == m.split and m.classes[int(s["cls"])] == cls_name
    # Shuffled before sharding: the first shard already mixes classes.
    assert len({int(s["cls"]) for s in read_shard(train.shards[0])}) > 1

    # The streams decode every sample back (EvalStream: one pass, every label).
    batches = list(EvalStream(val, batch_size=4, rank=0, world_size=1, augment=AugmentParams(image_size=16)))
    assert sum(b["corrupt"] for b in batches) == 0
    assert sorted(int(i) for b in batches for i in b["index"]) == list(range(9))
    assert sorted(int(c) for b in batches for c in b["label"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagefolder_seed_changes_order(jpeg_tree: Path, tmp_path: Path) -> None:
    a = build_imagefolder(str(jpeg_tree), str(tmp_path / "a"), shard_size=100, seed=0, progress=False)["train"]
    b = build_imagefolder(str(jpeg_tree), str(tmp_path / "b"), shard_size=100, seed=1, progress=False)["train"]
    assert [s["jpg"] for s in _raw_samples(a)] != [s["jpg"] for s in _raw_samples(b)]


def test_val_class_not_in_train(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "bad", n_train=2, n_val=1, val_classes=["cat", "zebra"])
    with pytest.raises(DataError, match="zebra"):
        build_imagefolder(str(root), str(tmp_path / "out"), progress=False)


def test_empty_split_and_missing_folder(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "noval", n_train=2, n_val=0)
    with pytest.raises(DataError, match=r"noval/val.*no images"):
        build_imagefolder(str(root), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty/train.*no class folders"):
        build_imagefolder(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match=r"nowhere/train.*missing folder"):
        build_imagefolder(str(tmp_path / "nowhere"), str(tmp_path / "out"), progress=False)


def test_write_split_rejects_bad_samples(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"sample 1 label 5"):
        write_split([(_png(0), "png", 0), (_png(1), "png", 5)], str(tmp_path), name="x", split="train",
                    classes=["a", "b"], channels=3, progress=False)
    with pytest.raises(DataError, match=r"extension 'gif'"):
        write_split([(b"GIF89a", "gif", 0)], str(tmp_path), name="x", split="train", classes=["a"], channels=3,
                    progress=False)
    with pytest.raises(DataError, match="no samples"):
        write_split([], str(tmp_path), name="x", split="train", classes=["a"], channels=3, progress=False)
    # Nothing half-written is published: no manifest, no temporary files.
    assert not (tmp_path / "train" / "manifest.json").exists()
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_mnist5k_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CLUSTER_CACHE", str(tmp_path / "cache"))
    assert builtin_names() == ["fashion-mnist", "mnist5k"]
    assert is_builtin("builtin://mnist5k/train") and not is_builtin(str(tmp_path))
    # Two processes building the cache at once: both succeed, one copy is published.
    code = "from kd_cluster.data import load_manifest; print(load_manifest('builtin://mnist5k/train').num_samples)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["4000", "4000"]
    train = load_manifest("builtin://mnist5k/train")
    val = load_manifest("builtin://mnist5k/val")
    assert (train.num_samples, val.num_samples) == (4000, 1000)
    assert (train.channels, train.classes) == (1, [str(d) for d in range(10)])
    assert [s.count for s in train.shards] == [250] * 16
    assert train.url == str(tmp_path / "cache" / "mnist5k-v1" / "train" / "manifest.json")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["mnist5k-v1"]  # no leftover temp folder

    samples = _raw_samples(val)
    assert sorted(int(s["idx"]) for s in samples) == list(range(1000))
    assert np.bincount([int(s["cls"]) for s in samples]).tolist() == [100] * 10  # stratified
    img = Image.open(io.BytesIO(samples[0]["png"]))
    assert (img.format, img.mode, img.size) == ("PNG", "L", (28, 28))
    train_pixels = {s["png"] for s in _raw_samples(train)}
    assert len(train_pixels) > 3900 and not train_pixels & {s["png"] for s in samples[:50]}

    assert load_manifest("builtin://mnist5k/train") == train  # second call: from cache
    with pytest.raises(DataError, match="mnist5k"):
        load_manifest("builtin://cifar/train")
    with pytest.raises(DataError, match="split"):
        load_manifest("builtin://mnist5k/test")


def test_missing_and_malformed_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"manifest not found: {tmp_path}/nope"):
        load_manifest(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="not_there.json"):
        load_manifest(str(tmp_path / "not_there.json"))
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=f"malformed manifest {tmp_path}/m1/manifest.json"):
        load_manifest(str(tmp_path / "m1"))
    doc = {"name": "x", "split": "train", "classes": ["a"], "channels": 3, "num_samples": 5,
           "shards": [{"url": "train-000000.tar", "count": 4, "first_index": 0}]}
    (tmp_path / "m1" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="add up to 4"):
        load_manifest(str(tmp_path / "m1"))
    del doc["classes"]
    (tmp_path / "m1" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="missing field 'classes'"):
        load_manifest(str(tmp_path / "m1"))


def _write_damaged(tmp_path: Path) -> Manifest:
    """Two shards of 10: sample 3 is a broken JPEG; shard 1 is cut inside sample 17's image."""
    samples = [(_png(i), "png", i % 2) for i in range(20)]
    samples[3] = (b"\xff\xd8\xff\xe0 definitely not a jpeg", "jpg", 1)
    m = write_split(samples, str(tmp_path / "ds"), name="damaged", split="train", classes=["a", "b"], channels=3,
                    shard_size=10, progress=False)
    path = Path(m.shards[1].url)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    # Cut inside the data of sample 17's image: samples 10..16 survive, 17..19 are lost.
    cut = next(mb for mb in members if mb.name == "000000017.png")
    data = path.read_bytes()
    path.write_bytes(data[: cut.offset_data + 50])
    return m


def test_truncated_shard_and_corrupt_image_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = _write_damaged(tmp_path)
    aug = AugmentParams(image_size=8)
    with caplog.at_level(logging.WARNING, logger="kd_cluster.data"):
        batches = list(EvalStream(m, batch_size=5, rank=0, world_size=1, augment=aug))
    assert [b["corrupt"] for b in batches] == [1, 0, 0, 3]
    assert [len(b["key"]) for b in batches] == [4, 5, 5, 2]
    got = sorted(int(i) for b in batches for i in b["index"])
    assert got == [i for i in range(17) if i != 3]
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and m.shards[1].url in warnings[0].getMessage()


def test_train_stream_skips_corrupt(tmp_path: Path) -> None:
    m = _write_damaged(tmp_path)
    stream = iter(TrainStream(m, batch_size=10, seed=0, rank=0, world_size=1, num_workers=0, start_step=0,
                              augment=AugmentParams(image_size=8)))
    batches = [next(stream) for _ in range(6)]  # three passes over 20 positions
    assert sum(b["corrupt"] for b in batches) == 3 * 4  # per pass: 1 undecodable + 3 lost to truncation
    assert all(b["corrupt"] + len(b["key"]) == 10 for b in batches)
    assert all(b["image"].shape[0] == len(b["key"]) == len(b["label"]) for b in batches)


def test_all_corrupt_batch_raises(tmp_path: Path) -> None:
    m = write_split([(b"garbage", "jpg", 0)] * 4, str(tmp_path), name="bad", split="val", classes=["a"], channels=3,
                    shard_size=4, progress=False)
    with pytest.raises(DataError, match="val-000000.tar"):
        list(EvalStream(m, batch_size=4, rank=0, world_size=1, augment=AugmentParams(image_size=8)))


# ----------------------------------------------------------------------------------------------- s3 (moto)


@pytest.fixture(scope="module")
def s3_options(s3) -> dict:
    s3.bucket("kd-test")
    return s3.options()


def test_s3_roundtrip(s3_options: dict, jpeg_tree: Path, tmp_path: Path) -> None:
    manifests = build_imagefolder(str(jpeg_tree), "s3://kd-test/tiny", shard_size=7, progress=False,
                                  storage_options=s3_options)
    loaded = load_manifest("s3://kd-test/tiny/train", storage_options=s3_options)
    assert loaded == manifests["train"]
    assert loaded.shards[0].url == "s3://kd-test/tiny/train/train-000000.tar"
    assert [s.count for s in loaded.shards] == [7, 7, 7, 7, 2]
    samples = _raw_samples(loaded, s3_options)
    assert sorted(int(s["idx"]) for s in samples) == list(range(30))

    stream = iter(TrainStream(loaded, batch_size=6, seed=1, rank=0, world_size=1, num_workers=0, start_step=0,
                              augment=AugmentParams(image_size=16), storage_options=s3_options))
    batch = next(stream)
    assert batch["image"].shape == (6, 3, 16, 16) and batch["corrupt"] == 0
    # Loader worker processes read from s3 too, and see exactly what the in-process stream sees.
    two = TrainStream(loaded, batch_size=6, seed=1, rank=0, world_size=1, num_workers=2, start_step=0,
                      augment=AugmentParams(image_size=16), storage_options=s3_options)
    via_loader = list(itertools.islice(make_train_loader(two, num_workers=2), 4))
    in_process = list(itertools.islice(iter(two), 4))
    assert [b["key"] for b in via_loader] == [b["key"] for b in in_process]
    assert all(b["corrupt"] == 0 for b in via_loader)

    with pytest.raises(DataError, match="s3://kd-test/nothing"):
        load_manifest("s3://kd-test/nothing", storage_options=s3_options)

    # Same bytes locally: a folder copied from s3 loads with the same relative layout.
    import fsspec

    fs = fsspec.filesystem("s3", **s3_options)
    fs.get("kd-test/tiny/val/", str(tmp_path / "val"), recursive=True)
    local = load_manifest(str(tmp_path / "val"))
    assert [s.count for s in local.shards] == [s.count for s in manifests["val"].shards]
    assert os.path.exists(local.shards[0].url)


def test_max_side_reencodes_large_images_only_and_the_manifest_says_so(tmp_path: Path) -> None:
    from kd_cluster.data import Reencode

    big, small = _jpeg(1, (400, 300)), _jpeg(2, (60, 40))
    gray = io.BytesIO()
    Image.fromarray(np.full((200, 100), 77, np.uint8)).save(gray, format="PNG")
    samples = [(big, "jpg", 0), (small, "jpg", 1), (gray.getvalue(), "png", 2), (b"not an image", "jpg", 0)]
    m = write_split(samples, str(tmp_path / "out"), name="t", split="train", classes=CLASSES, channels=3,
                    shard_size=10, progress=False, reencode=Reencode(128, quality=75), jobs=1)
    assert m.reencode == {"max_side": 128, "quality": 75, "reencoded": 2}
    assert json.loads(Path(m.url).read_text())["reencode"] == m.reencode
    assert load_manifest(m.url).reencode == m.reencode
    raw = _raw_samples(m)
    shrunk = Image.open(io.BytesIO(raw[0]["jpg"]))
    assert shrunk.format == "JPEG" and shrunk.size == (128, 96)
    assert raw[1]["jpg"] == small  # not larger than max side: stored as given
    png = Image.open(io.BytesIO(raw[2]["png"]))
    assert png.format == "PNG" and png.size == (64, 128) and png.mode == "L"  # lossless stays lossless
    assert raw[3]["jpg"] == b"not an image"  # unreadable: stored as given, the streams count it as corrupt
    stream = TrainStream(m, batch_size=4, seed=0, rank=0, world_size=1, num_workers=0, start_step=0,
                         augment=AugmentParams(image_size=32))
    batch = next(iter(stream))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["corrupt"] == 1


def test_max_side_in_parallel_gives_the_same_shards(tmp_path: Path) -> None:
    from kd_cluster.data import Reencode

    samples = [(_jpeg(i, (90 + i, 70)), "jpg", i % 3) for i in range(6)]
    kw = dict(name="t", split="train", classes=CLASSES, channels=3, shard_size=4, progress=False,
              reencode=Reencode(64))
    one = write_split(samples, str(tmp_path / "a"), jobs=1, **kw)
    two = write_split(samples, str(tmp_path / "b"), jobs=2, **kw)
    assert [s["jpg"] for s in _raw_samples(one)] == [s["jpg"] for s in _raw_samples(two)]
    assert one.reencode == two.reencode == {"max_side": 64, "quality": 90, "reencoded": 6}
    with pytest.raises(DataError, match="--max-side must be >= 8"):
        Reencode(4)
    with pytest.raises(DataError, match="--quality must be in 1..100"):
        Reencode(64, quality=0)


# ------------------------------------------------------------------------------------ hostile samples in a shard


def _png_bomb(side: int) -> bytes:
    """A valid grayscale PNG of side x side zero pixels: a few hundred KiB that decode to side**2 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one zero byte per pixel
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_skipped_as_corrupt_without_decoding(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10,000 x 10,000 PNG (10^8 pixels: under PIL's own error threshold, so PIL would decode it) is dropped
    from its batch and counted, and no image decode of its pixels is ever started."""
    from PIL import ImageFile

    from kd_cluster.data.augment import MAX_IMAGE_PIXELS, ImageTooLarge, image_size

    bomb = _png_bomb(10_000)
    assert len(bomb) < 1 << 20 and 10_000 ** 2 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge, match="10000 x 10000"):
        image_size(bomb)
    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> Any:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    samples = [(_png(i), "png", 0) for i in range(4)]
    samples[2] = (bomb, "png", 0)
    m = write_split(samples, str(tmp_path / "ds"), name="bomb", split="val", classes=["a"], channels=3,
                    shard_size=4, progress=False)
    (batch,) = list(EvalStream(m, batch_size=4, rank=0, world_size=1, augment=AugmentParams(image_size=8)))
    assert batch["corrupt"] == 1 and batch["key"] == ["000000000", "000000001", "000000003"]
    assert (10_000, 10_000) not in loads and len(loads) == 3  # the three good images were decoded, not the bomb


def test_tar_member_climbing_out_is_never_written_and_counts_as_corrupt(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    m = write_split([(_png(i), "png", 0) for i in range(3)], str(tmp_path / "a" / "b" / "ds"), name="evil",
                    split="val", classes=["a"], channels=3, shard_size=3, progress=False)
    shard = Path(m.shards[0].url)
    with tarfile.open(shard) as tf:
        members = [(mb, tf.extractfile(mb).read()) for mb in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:  # sample 1 renamed to ../../x, an absolute name is sample 2's
        for mb, data in members:
            if mb.name.startswith("000000001."):
                mb.name = "../../x." + mb.name.split(".", 1)[1]
            elif mb.name.startswith("000000002."):
                mb.name = "/tmp/kdc-evil-" + tmp_path.name + "." + mb.name.split(".", 1)[1]
            tf.addfile(mb, io.BytesIO(data))
    work = tmp_path / "a" / "b" / "c"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative write of ../../x would land in tmp_path/a
    before = {p for p in tmp_path.rglob("*")}
    (batch,) = list(EvalStream(m, batch_size=3, rank=0, world_size=1, augment=AugmentParams(image_size=8)))
    assert batch["corrupt"] == 2 and batch["key"] == ["000000000"]
    assert {p for p in tmp_path.rglob("*")} == before
    assert not list(Path("/tmp").glob(f"kdc-evil-{tmp_path.name}*"))
    raw = read_shard(m.shards[0])
    assert raw[0] is not None and raw[1] is None and raw[2] is None
