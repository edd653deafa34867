"""Data-loading benchmark: TrainStream vs. torchvision ImageFolder on the same ImageNet-sized JPEGs.

Generates an ImageNet-layout folder of ~500x375 JPEGs (smooth gradients, waves and noise, so their
size and decode cost are like real photos), shards it, then measures on the same cores, with the same
DataLoader worker count and batch size, images/s of

(a) :class:`~kd_cluster.data.TrainStream`: decode (with JPEG draft) + Inception crop + flip, uint8;
(b) ``torchvision.datasets.ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
    ``PILToTensor`` in a shuffling DataLoader;

(c) the loader of ``data.decode: gpu`` on the originals: it reads the bytes and draws each sample's crop and
    flip, and leaves decoding to the training worker's GPU (the CPU cost per image that GPU decode leaves);

(a) and (b) each on the originals and, with ``max_side``, on the same images re-encoded to that longer side
(:func:`~kd_cluster.data.shrink_image`, what ``shards build --max-side`` writes): the shards are written
from an ImageFolder tree of the re-encoded files, so both loaders read the very same bytes.

``kd-cluster bench data`` (and ``tests/benchmarks/bench_data.py``) runs :func:`run`.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kd_cluster.data.augment import AugmentParams
from kd_cluster.data.stream import TrainStream, make_train_loader
from kd_cluster.data.writer import Reencode, build_imagefolder, shrink_image


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    xx = np.arange(width, dtype=np.float32)[None, :]
    yy = np.arange(height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), dtype=np.float32)
    for ch in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        fx, fy = rng.uniform(0.005, 0.05, 2)
        wave = np.sin(xx * fx + rng.uniform(0, 6)) * np.cos(yy * fy + rng.uniform(0, 6))  # separable: cheap
        img[..., ch] = 128 + 60 * (a * xx / width + b * yy / height) + 40 * c * wave
    img += rng.standard_normal((height, width, 3), dtype=np.float32) * 14
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_imagenet_like(root: Path, *, n_images: int, n_classes: int, seed: int = 0) -> int:
    """Write ``root/{train,val}/<class>/*.JPEG``: ``n_images`` train images over ``n_classes``, a few val.

    Sizes vary around ImageNet's typical 500x375. Returns the total bytes of the train images.
    """
    rng = np.random.default_rng(seed)
    total = 0
    for split, n in (("train", n_images), ("val", n_classes)):
        for i in range(n):
            d = root / split / f"n{i % n_classes:08d}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = (500, 375) if rng.random() < 0.5 else (int(rng.integers(333, 500)), int(rng.integers(333, 500)))
            data = photo_like_jpeg(rng, w, h)
            (d / f"{split}_{i:06d}.JPEG").write_bytes(data)
            total += len(data) if split == "train" else 0
    return total


def reencode_tree(src: Path, dst: Path, reencode: Reencode) -> int:
    """Copy the ImageFolder tree ``src`` to ``dst`` with every image shrunk as ``shards build --max-side`` would
    (same file names); returns the total bytes of the train images written."""
    total = 0
    for path in sorted(src.rglob("*.JPEG")):
        data = path.read_bytes()
        out = shrink_image(data, "jpg", reencode)
        data = out[0] if out is not None else data
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        total += len(data) if path.relative_to(src).parts[0] == "train" else 0
    return total


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc); NaN where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


class _Pipeline:
    """A running loader, its worker processes, and per-round throughput figures."""

    def __init__(self, make: Callable[[], Iterator[Any]], count: Callable[[Any], int], drain: int) -> None:
        before = {p.pid for p in multiprocessing.active_children()}
        self.it = make()
        next(self.it)  # make sure the workers are up
        self.pids = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
        self.count, self.drain = count, drain
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def _cpu_s(self) -> float:
        return time.process_time() + sum(_process_cpu_s(pid) for pid in self.pids)

    def round(self, n_images: int) -> None:
        # Drain what the loader prefetched while idle, so the timed batches are produced inside the window.
        for _ in range(self.drain):
            next(self.it)
        seen, wall0, cpu0 = 0, time.perf_counter(), self._cpu_s()
        while seen < n_images:
            seen += self.count(next(self.it))
        self.wall.append(seen / (time.perf_counter() - wall0))
        self.cpu.append(seen / (self._cpu_s() - cpu0))

    def close(self) -> None:
        del self.it


def _torchvision_batches(root: Path, size: int, workers: int, batch_size: int) -> Iterator[Any]:
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root / "train"), transform=tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    while True:
        yield from loader


def run(
    n_images: int = 800,
    size: int = 224,
    workers: int | None = None,
    *,
    batch_size: int = 32,
    timed_images: int | None = None,
    rounds: int = 5,
    n_classes: int = 8,
    max_side: int | None = 320,
    quality: int = 90,
    workdir: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and return its figures (and print a table when ``verbose``).

    ``workers`` defaults to the number of cores. All loaders run side by side and are timed in
    alternation, ``rounds`` rounds of ``timed_images`` images each (default ``n_images``), so all see
    the same background load; medians are reported. Two figures per pipeline: images/s of wall time
    (what a trainer gets on this machine now) and images per CPU-second spent by the loader's worker
    processes plus the main process ("per core": robust to other load on the machine; Linux only).
    ``max_side`` (None: off) adds both loaders on the images re-encoded to that longer side at ``quality``.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    timed = timed_images or n_images
    sets = {"": None} | ({"small": Reencode(max_side, quality)} if max_side else {})
    with tempfile.TemporaryDirectory(dir=workdir, prefix="kd_bench_data_") as tmp:
        root = Path(tmp) / "imagenet_like"
        t0 = time.perf_counter()
        jpeg_bytes = {"": make_imagenet_like(root, n_images=n_images, n_classes=n_classes)}
        t_gen = time.perf_counter() - t0
        roots = {"": root}
        for key, reencode in sets.items():
            if reencode is not None:
                roots[key] = Path(tmp) / f"max_side_{reencode.max_side}"
                jpeg_bytes[key] = reencode_tree(root, roots[key], reencode)
        # Enough shards that every worker's split holds several.
        shard_size = max(1, n_images // (4 * max(1, workers)))
        drain = 2 * max(1, workers) + 1  # prefetch_factor (2) batches per worker, plus one
        t0 = time.perf_counter()
        pipes: dict[str, _Pipeline] = {}
        for key in sets:
            manifest = build_imagefolder(str(roots[key]), str(Path(tmp) / f"shards{key}"), shard_size=shard_size,
                                         progress=False)["train"]
            stream = TrainStream(manifest, batch_size=batch_size, seed=0, rank=0, world_size=1, num_workers=workers,
                                 start_step=0, augment=AugmentParams(image_size=size))
            pipes[f"trainstream{key}"] = _Pipeline(
                lambda stream=stream: iter(make_train_loader(stream, num_workers=workers)), lambda b: len(b["key"]),
                drain)
            pipes[f"torchvision{key}"] = _Pipeline(
                lambda r=roots[key]: _torchvision_batches(r, size, workers, batch_size), lambda b: len(b[1]), drain)
            if not key:
                gpu_stream = TrainStream(manifest, batch_size=batch_size, seed=0, rank=0, world_size=1,
                                         num_workers=workers, start_step=0, augment=AugmentParams(image_size=size),
                                         decode="gpu")
                pipes["gpu_loader"] = _Pipeline(lambda: iter(make_train_loader(gpu_stream, num_workers=workers)),
                                                lambda b: len(b["key"]), drain)
        t_shard = time.perf_counter() - t0
        for _ in range(rounds):
            for pipe in pipes.values():
                pipe.round(timed)
        for pipe in pipes.values():
            pipe.close()

    med = statistics.median
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average": "/".join(f"{x:.1f}" for x in os.getloadavg()),
        "workers": workers,
        "batch_size": batch_size,
        "image_size": size,
        "dataset_images": n_images,
        "mean_jpeg_kb": jpeg_bytes[""] / n_images / 1024,
        "timed_images": timed,
        "rounds": rounds,
        "generate_s": t_gen,
        "shard_s": t_shard,
    }
    for key in sets:
        ours, theirs = pipes[f"trainstream{key}"], pipes[f"torchvision{key}"]
        sfx = f"_{key}" if key else ""
        result |= {
            f"trainstream{sfx}_img_s": med(ours.wall),
            f"trainstream{sfx}_img_per_cpu_s": med(ours.cpu),
            f"torchvision{sfx}_img_s": med(theirs.wall),
            f"torchvision{sfx}_img_per_cpu_s": med(theirs.cpu),
            f"ratio{sfx}": med(ours.wall) / med(theirs.wall),
            f"ratio{sfx}_per_cpu_s": med(ours.cpu) / med(theirs.cpu),
            f"trainstream{sfx}_rounds_img_s": ours.wall,
            f"torchvision{sfx}_rounds_img_s": theirs.wall,
        }
    gl = pipes["gpu_loader"]
    result |= {"gpu_loader_img_s": med(gl.wall), "gpu_loader_img_per_cpu_s": med(gl.cpu),
               "gpu_loader_rounds_img_s": gl.wall}
    if max_side:
        result |= {
            "max_side": max_side,
            "quality": quality,
            "mean_jpeg_kb_small": jpeg_bytes["small"] / n_images / 1024,
            "speedup_small_trainstream": result["trainstream_small_img_s"] / result["trainstream_img_s"],
            "speedup_small_trainstream_per_cpu_s": (result["trainstream_small_img_per_cpu_s"]
                                                    / result["trainstream_img_per_cpu_s"]),
            "speedup_small_torchvision": result["torchvision_small_img_s"] / result["torchvision_img_s"],
            "speedup_small_torchvision_per_cpu_s": (result["torchvision_small_img_per_cpu_s"]
                                                    / result["torchvision_img_per_cpu_s"]),
        }
    if verbose:
        print(format_table(result))
    return result


def format_table(r: dict[str, Any]) -> str:
    """A small text table of a :func:`run` result."""
    sets = [("", "originals")] + ([("_small", f"max side {r['max_side']}")] if "max_side" in r else [])
    rows = []
    for sfx, label in sets:
        rows += [
            (f"kd_cluster TrainStream, {label}", r[f"trainstream{sfx}_img_s"], r[f"trainstream{sfx}_img_per_cpu_s"]),
            (f"torchvision ImageFolder, {label}", r[f"torchvision{sfx}_img_s"], r[f"torchvision{sfx}_img_per_cpu_s"]),
            (f"ratio TrainStream / ImageFolder, {label}", r[f"ratio{sfx}"], r[f"ratio{sfx}_per_cpu_s"]),
        ]
    rows.append(("loader of decode: gpu (bytes + crop parameters)", r["gpu_loader_img_s"],
                 r["gpu_loader_img_per_cpu_s"]))
    if "max_side" in r:
        rows += [
            (f"ratio max side {r['max_side']} / originals, TrainStream", r["speedup_small_trainstream"],
             r["speedup_small_trainstream_per_cpu_s"]),
            (f"ratio max side {r['max_side']} / originals, ImageFolder", r["speedup_small_torchvision"],
             r["speedup_small_torchvision_per_cpu_s"]),
        ]
    small = (f"; re-encoded to max side {r['max_side']} at quality {r['quality']}: "
             f"{r['mean_jpeg_kb_small']:.0f} KB avg") if "max_side" in r else ""
    lines = [
        f"data loading, {r['machine']}: {r['workers']} loader workers, batch {r['batch_size']}, "
        f"{r['image_size']} px, {r['dataset_images']} JPEGs of {r['mean_jpeg_kb']:.0f} KB avg{small}; "
        f"median of {r['rounds']} alternating rounds of {r['timed_images']} images; load average {r['load_average']}",
        f"{'pipeline':<52}{'images/s':>10}{'per core (img/CPU-s)':>22}",
    ]
    lines += [f"{name:<52}{a:>10.2f}{b:>22.2f}" if name.startswith("ratio") else f"{name:<52}{a:>10.1f}{b:>22.1f}"
              for name, a, b in rows]
    return "\n".join(lines)
