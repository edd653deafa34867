"""The determinism contract of the train stream, the eval stream, decoding/augmentation and mixup."""

from __future__ import annotations

import gc
import io
import itertools
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_cluster.data import (
    AugmentParams,
    DataError,
    EvalStream,
    Manifest,
    TrainStream,
    close_loader,
    make_eval_loader,
    make_train_loader,
    mixup,
    mixup_lambda,
    write_split,
)
from kd_cluster.data.augment import center_crop_box, decode_views, random_resized_crop_box

N_SHARDS, PER_SHARD = 12, 20
AUG = AugmentParams(image_size=8)


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    n = N_SHARDS * PER_SHARD
    samples = ((_png(i), "png", i % 4) for i in range(n))
    return write_split(samples, str(tmp_path_factory.mktemp("ds")), name="synthetic", split="train",
                       classes=["a", "b", "c", "d"], channels=3, shard_size=PER_SHARD, progress=False)


def _stream(manifest: Manifest, **kw: object) -> TrainStream:
    args: dict = dict(batch_size=16, seed=7, rank=0, world_size=1, num_workers=0, start_step=0, augment=AUG)
    args.update(kw)
    return TrainStream(manifest, **args)


def _take(it: Iterable[dict], n: int) -> list[dict]:
    return list(itertools.islice(it, n))


def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["step"] for x in a] == [y["step"] for y in b]
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(x["index"], y["index"])


def test_same_inputs_same_batches(manifest: Manifest) -> None:
    a = _take(iter(_stream(manifest, rank=1, world_size=2, num_workers=2, start_step=3)), 6)
    b = _take(iter(_stream(manifest, rank=1, world_size=2, num_workers=2, start_step=3)), 6)
    _same(a, b)
    assert [x["step"] for x in a] == [3, 4, 5, 6, 7, 8]
    assert all(x["image"].shape == (16, 3, 8, 8) and x["corrupt"] == 0 for x in a)


def test_different_seeds_differ(manifest: Manifest) -> None:
    a = next(iter(_stream(manifest, seed=0)))
    b = next(iter(_stream(manifest, seed=1)))
    assert a["key"] != b["key"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equivalence(manifest: Manifest, num_workers: int) -> None:
    # One pass is 6 shards x 20 / 16 = 7.5 batches per split for num_workers=2 (15 for num_workers=0), so
    # the runs cross pass boundaries inside batches; restarting at 33 skips whole passes arithmetically.
    n = 40
    fresh = _take(iter(_stream(manifest, num_workers=num_workers)), n)
    assert [b["step"] for b in fresh] == list(range(n))
    for m in (7, 33):
        resumed_stream = _stream(manifest, num_workers=num_workers, start_step=m)
        resumed = _take(iter(make_train_loader(resumed_stream, num_workers=num_workers)), n - m)
        _same(fresh[m:], resumed)
    if num_workers:  # the single-process emulation equals a real multi-worker loader from step 0 as well
        _same(fresh, _take(iter(make_train_loader(_stream(manifest, num_workers=num_workers), num_workers=2)), n))


def test_splits_disjoint_within_pass(manifest: Manifest) -> None:
    world, workers, bs = 2, 2, 10
    per_split_batches = (N_SHARDS // (world * workers)) * PER_SHARD // bs  # one whole pass
    seen: dict[tuple[int, int], list[int]] = {}
    for rank in range(world):
        stream = _stream(manifest, batch_size=bs, rank=rank, world_size=world, num_workers=workers)
        for batch in _take(iter(stream), per_split_batches * workers):
            seen.setdefault((rank, batch["step"] % workers), []).extend(batch["index"].tolist())
    assert len(seen) == 4
    everything = [i for idx in seen.values() for i in idx]
    assert len(everything) == len(set(everything)) == N_SHARDS * PER_SHARD  # disjoint and complete
    for idx in seen.values():  # a split reads whole shards
        assert len({i // PER_SHARD for i in idx}) == N_SHARDS // 4


def test_passes_reshuffle(manifest: Manifest) -> None:
    stream = _stream(manifest, batch_size=PER_SHARD * N_SHARDS)  # one batch = one pass
    first, second = _take(iter(stream), 2)
    assert sorted(first["index"].tolist()) == sorted(second["index"].tolist()) == list(range(N_SHARDS * PER_SHARD))
    assert first["index"].tolist() != second["index"].tolist()


def test_stream_argument_errors(manifest: Manifest) -> None:
    with pytest.raises(DataError, match="at least 16 shards"):
        _stream(manifest, world_size=4, num_workers=4)
    with pytest.raises(DataError, match="must match"):
        make_train_loader(_stream(manifest, num_workers=2), num_workers=1)
    with pytest.raises(DataError, match="views"):
        _stream(manifest, views=("aug", "aug"))


def test_view_shapes_and_dtypes(manifest: Manifest) -> None:
    b = next(iter(_stream(manifest, views=("aug", "aug2"))))
    assert b["image"].dtype == b["image_t"].dtype == torch.uint8
    assert b["image"].shape == b["image_t"].shape == (16, 3, 8, 8)
    assert b["label"].dtype == b["index"].dtype == torch.int64 and len(b["key"]) == 16
    assert not torch.equal(b["image"], b["image_t"])  # independently drawn crops

    c = next(iter(_stream(manifest, views=("aug", "center"))))
    assert torch.equal(c["image"], b["image"])  # view 0 does not depend on which second view is asked
    gray = next(iter(_stream(manifest, views=("center",), augment=AugmentParams(image_size=6, channels=1))))
    assert gray["image"].shape == (16, 1, 6, 6) and "image_t" not in gray


def _structured_jpeg(w: int, h: int) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_decode_matches_reference_transforms() -> None:
    data = _structured_jpeg(500, 375)
    params = AugmentParams(image_size=32)
    out = [np.empty((3, 32, 32), np.uint8) for _ in range(2)]
    decode_views(data, ("center", "aug"), params, (0, 0, 0, 0), out)

    # Center view == Resize(shorter side 36) + CenterCrop(32) on the full decode, up to resampling noise.
    import torchvision.transforms.v2 as T

    ref = T.Compose([T.Resize(int(32 * 256 / 224)), T.CenterCrop(32), T.PILToTensor()])(Image.open(io.BytesIO(data)))
    assert np.abs(out[0].astype(int) - ref.numpy().astype(int)).mean() < 3

    # The aug view equals cropping the same box from a full decode (draft only changes the resampling).
    rng_box = random_resized_crop_box(500, 375, params.crop_scale, params.crop_ratio, np.random.default_rng(0))
    assert 0 <= rng_box[0] < rng_box[2] <= 500 and 0 <= rng_box[1] < rng_box[3] <= 375
    assert out[1].shape == (3, 32, 32) and out[1].dtype == np.uint8

    box = center_crop_box(500, 375, 224, 256 / 224)
    assert box == pytest.approx((250 - 328.125 / 2, 187.5 - 328.125 / 2, 250 + 328.125 / 2, 187.5 + 328.125 / 2))


def test_draft_keeps_enough_resolution() -> None:
    data = _structured_jpeg(800, 640)
    params = AugmentParams(image_size=64, flip=False)
    fast = [np.empty((3, 64, 64), np.uint8)]
    decode_views(data, ("center",), params, (), fast)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    slow = np.asarray(full.resize((64, 64), Image.Resampling.BILINEAR, box=center_crop_box(800, 640, 64, 256 / 224)))
    assert np.abs(fast[0].transpose(1, 2, 0).astype(int) - slow.astype(int)).mean() < 3


def test_flip_rate() -> None:
    data = _structured_jpeg(64, 48)
    params = AugmentParams(image_size=16, crop_scale=(1.0, 1.0), crop_ratio=(64 / 48, 64 / 48))
    flipped = 0
    for i in range(200):
        out = [np.empty((3, 16, 16), np.uint8)]
        decode_views(data, ("aug",), params, (0, 0, 0, i), out)
        flipped += int(out[0][0, 8, 0]) > int(out[0][0, 8, -1])  # red grows left to right unless flipped
    assert 60 < flipped < 140


def test_mixup_lambda() -> None:
    lams = [mixup_lambda(seed=3, step=s, alpha=0.2) for s in range(200)]
    assert all(0.5 <= lam <= 1.0 for lam in lams)
    assert len(set(lams)) == 200
    assert lams == [mixup_lambda(3, s, 0.2) for s in range(200)]  # a pure function of (seed, step)
    assert mixup_lambda(4, 0, 0.2) != lams[0]
    assert mixup_lambda(3, 5, 0.0) == 1.0
    with pytest.raises(DataError):
        mixup_lambda(3, 5, -1.0)


def test_mixup_formula() -> None:
    x = torch.tensor([[0, 10], [100, 200], [50, 50]], dtype=torch.uint8)
    lam = 0.75
    expected = torch.tensor([
        [0.75 * 0 + 0.25 * 50, 0.75 * 10 + 0.25 * 50],
        [0.75 * 100 + 0.25 * 0, 0.75 * 200 + 0.25 * 10],
        [0.75 * 50 + 0.25 * 100, 0.75 * 50 + 0.25 * 200],
    ])
    got = mixup(x, lam)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    xf = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(mixup(xf, 1.0), xf)


def test_eval_covers_each_sample_once(manifest: Manifest) -> None:
    world = 3
    seen: list[int] = []
    for rank in range(world):
        stream = EvalStream(manifest, batch_size=16, rank=rank, world_size=world, augment=AUG)
        batches = list(stream)
        assert len(batches) == len(stream) and all(b["image"].shape[1:] == (3, 8, 8) for b in batches)
        assert all(len(b["key"]) == 16 for b in batches[:-1])
        idx = [i for b in batches for i in b["index"].tolist()]
        assert idx == list(range(rank, N_SHARDS * PER_SHARD, world))  # deterministic order
        seen += idx
    assert sorted(seen) == list(range(N_SHARDS * PER_SHARD))

    # Under a 2-worker DataLoader the in-order loader yields the same batches.
    stream = EvalStream(manifest, batch_size=16, rank=1, world_size=world, augment=AUG)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    a, b = list(stream), list(loader)
    assert [x["key"] for x in a] == [y["key"] for y in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))


def test_data_layer_imports_no_ray_or_wandb() -> None:
    import subprocess
    import sys

    # kd_cluster.urls is the one layer below data (standard library only); nothing else of the package may load
    code = ("import sys, kd_cluster.data; bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'wandb') "
            "or (m.startswith('kd_cluster.') and not m.startswith('kd_cluster.data') and m != 'kd_cluster.urls')]; "
            "assert not bad, bad; assert 'kd_cluster.data' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_process_holding_a_live_loader_still_exits() -> None:
    """Loader workers ignore SIGTERM; a process that exits while it still references a running loader (from a
    traceback, say) must still exit, and its loader processes with it."""
    script = textwrap.dedent("""
        import torch
        from torch.utils.data import IterableDataset
        from kd_cluster.data import make_eval_loader, start_workers

        class Endless(IterableDataset):
            def __iter__(self):
                while True:
                    yield torch.zeros(3)

        loader = make_eval_loader(Endless(), num_workers=1)
        start_workers(loader)
        it = iter(loader)
        next(it)
        print(*(w.pid for w in it._workers), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert pids
    time.sleep(0.5)
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z", f"loader process {pid} lives on"


class _Finalized:
    """Part of a reference cycle; records the process that finalizes it."""

    def __init__(self, log: Path) -> None:
        self.log, self.me = log, self

    def __del__(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


class _Collecting(torch.utils.data.IterableDataset):
    def __iter__(self):
        gc.collect()
        yield torch.zeros(1)


def test_loader_workers_never_finalize_objects_of_the_training_process(tmp_path: Path) -> None:
    """Garbage the training process had not collected yet when it forked its loader (in a Ray process: gRPC
    and Ray handles) is never finalized in a loader worker."""
    log = tmp_path / "finalized.txt"
    gc.disable()
    try:
        _Finalized(log)  # unreachable at once, but only the cyclic collector can free it
        loader = make_eval_loader(_Collecting(), num_workers=1)
        assert len(list(loader)) == 1
        close_loader(loader)
    finally:
        gc.enable()
    gc.collect()
    assert log.read_text().split() == [str(os.getpid())]  # finalized once, here, not in the worker
