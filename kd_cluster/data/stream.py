"""Streaming batches from sharded splits: the deterministic train stream and the one-pass eval stream.

Determinism contract
====================

The global training step is the data cursor. A train stream is a pure function of
``(seed, rank, loader worker, step)``; nothing else (wall clock, worker start order, where a run was
resumed) changes which samples a step sees or how they are augmented.

Virtual workers.
    Let ``W = max(1, num_workers)``. The batch of global step ``s`` on a rank comes from *virtual
    worker* ``v = s % W``, as that virtual worker's ``k``-th batch, ``k = s // W``. When a DataLoader
    is (re)started at ``start_step``, real loader worker ``i`` serves virtual worker
    ``v = (start_step + i) % W``, starting at its batch ``k0`` = the number of steps
    ``s' < start_step`` with ``s' % W == v``. PyTorch's in-order DataLoader hands out worker ``i``'s
    batches round-robin starting at worker 0, so step ``start_step + j`` is served by real worker
    ``j % W``, i.e. by virtual worker ``(start_step + j) % W``: the same batch an uninterrupted run
    produces at that step. Iterated without a DataLoader (or with ``num_workers=0``), the stream
    interleaves its ``W`` virtual workers itself in the same order, so it yields the identical
    sequence of batches in one process.

Splits.
    ``S = world_size * W`` splits; the split id of (rank, virtual worker ``v``) is ``rank * W + v``.
    Pass (epoch) ``e`` of a split: the manifest's shard list is permuted by a generator seeded by
    ``(seed, e)``; split id ``i`` takes shards ``perm[i::S]``, truncated to ``n_shards // S`` shards, so
    every split reads the same number of shards (the ``n_shards % S`` left over in a pass are skipped
    in that pass; a different permutation picks them up in other passes). Guarantee: within one pass,
    no two (rank, worker) pairs read the same shard, hence never the same sample. ``n_shards >= S`` is
    required. Within a shard the sample order of pass ``e`` is a permutation seeded by
    ``(seed, e, shard position in the manifest)``. The split's raw position sequence is the
    concatenation of passes ``e = 0, 1, 2, ...``; each batch takes the next ``batch_size`` positions.

Resume without replaying decoded data.
    A virtual worker starting at batch ``k0`` starts at raw position ``k0 * batch_size``: whole passes
    and whole shards are skipped arithmetically from the manifest counts; inside the starting shard the
    tar is read (bytes only, nothing decoded) and iteration begins at the offset.

Augmentation randomness.
    Each sample's crop/flip is drawn from a numpy Generator seeded by
    ``(seed, e, shard position, position in shard, view tag)``; it does not depend on the rank, the
    worker, the batch or the resume point.

Corrupt samples.
    Skipped and counted, never fatal: an image that fails to decode, a sample with a missing or bad
    label/index, or positions missing because a tar is truncated or raises part-way (the manifest count
    promises more than the tar yields). Such a batch has fewer than ``batch_size`` samples and its
    ``"corrupt"`` entry says how many were dropped; the positions are consumed all the same, so later
    steps are unaffected. A batch in which every position is corrupt raises :class:`DataError` naming
    the shards. A warning is logged the first time a process finds a shard truncated.

Memory: a loader worker holds the raw bytes of one shard at a time (it must, to visit the shard in
permuted order).
"""

from __future__ import annotations

import atexit
import bisect
import gc
import logging
import multiprocessing.util  # noqa: F401  (its exit hook must be registered before ours, so ours runs first)
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ._util import SeedTag, seeded_rng
from .augment import AugmentParams, check_views, decode_views, render_views
from .errors import DataError
from .gpu_decode import GpuBatchBuilder
from .manifest import Manifest
from .shards import RawSample, read_shard
from .soft_labels import StoredViews

log = logging.getLogger(__name__)

Batch = dict[str, Any]
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

# (shard position, position in shard, raw sample or None if missing, augmentation seed parts)
_Item = tuple[int, int, RawSample | None, tuple[int, ...]]


def _check_placement(manifest: Manifest, batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"{manifest.url}: batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"{manifest.url}: need 0 <= rank < world_size, got rank={rank} world_size={world_size}")


class _ShardCache:
    """The raw samples of the most recently read shard of a manifest."""

    def __init__(self, manifest: Manifest, storage_options: dict[str, Any] | None) -> None:
        self._manifest = manifest
        self._storage_options = storage_options
        self._position = -1
        self._samples: list[RawSample | None] = []

    def get(self, position: int) -> list[RawSample | None]:
        if position != self._position:
            self._samples = []  # release the previous shard before reading the next
            self._samples = read_shard(self._manifest.shards[position], self._storage_options)
            self._position = position
        return self._samples


def _decode_batch(
    items: Sequence[_Item], views: Sequence[str], augment: AugmentParams, manifest: Manifest,
    stored: StoredViews | None = None, decode: str = "cpu",
) -> Batch:
    n_items = len(items)
    shape = (n_items, augment.channels, augment.image_size, augment.image_size)
    images = [np.empty(shape, dtype=np.uint8) for _ in views]
    labels = np.empty(n_items, dtype=np.int64)
    indices = np.empty(n_items, dtype=np.int64)
    if stored is not None and stored.form == "logits":
        soft_l = np.empty((n_items, manifest.num_classes), dtype=np.float16)
    elif stored is not None:
        soft_p = np.empty((n_items, stored.top_k), dtype=np.float16)
        soft_c = np.empty((n_items, stored.top_k), dtype=np.int64)
    keys: list[str] = []
    n = 0
    gpu = GpuBatchBuilder(views, augment) if decode == "gpu" else None  # colour JPEGs: shipped encoded
    for shard_pos, pos, sample, seed_parts in items:
        if sample is None:
            continue
        try:
            label = int(sample["cls"])
            index = int(sample["idx"])
            if not 0 <= label < manifest.num_classes:
                raise ValueError(f"label {label} out of range")
            data = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
            if data is None:
                raise KeyError(f"no image member (one of {_IMAGE_KEYS})")
            if stored is None:
                if gpu is None or not gpu.take(n, data, seed_parts):
                    decode_views(data, views, augment, seed_parts, [im[n] for im in images])
            else:  # replay the crop the teacher labelled; seed_parts = (seed, pass, shard, position)
                view = stored.view(manifest.shards[shard_pos], shard_pos, pos, index, seed_parts[1])
                if view is None:
                    raise ValueError("not labelled (it could not be decoded when the labels were made)")
                if gpu is None or not gpu.take(n, data, seed_parts, [view.params]):
                    render_views(data, [view.params], augment, [images[0][n]])
                if view.logits is not None:
                    soft_l[n] = view.logits
                else:
                    soft_p[n], soft_c[n] = view.probs, view.classes
        except DataError:
            raise  # labels that do not belong to this data: not a damaged sample
        except Exception as e:  # any decode/parse failure makes the sample corrupt, never the run
            log.debug("corrupt sample %s in %s: %s", sample.get("__key__"), manifest.shards[shard_pos].url, e)
            continue
        labels[n] = label
        indices[n] = index
        keys.append(sample["__key__"])
        n += 1
    if n == 0:
        urls = sorted({manifest.shards[s].url for s, _, _, _ in items})
        raise DataError(
            f"every sample of a batch ({n_items} positions) is corrupt or missing; shards: {', '.join(urls)}"
        )
    batch: Batch = {
        "image": torch.from_numpy(images[0][:n]),
        "label": torch.from_numpy(labels[:n]),
        "index": torch.from_numpy(indices[:n]),
        "key": keys,
        "corrupt": n_items - n,
    }
    if len(views) > 1:
        batch["image_t"] = torch.from_numpy(images[1][:n])
    if stored is not None and stored.form == "logits":
        batch["soft_logits"] = torch.from_numpy(soft_l[:n])
    elif stored is not None:
        batch["soft_probs"] = torch.from_numpy(soft_p[:n])
        batch["soft_classes"] = torch.from_numpy(soft_c[:n])
    if gpu is not None:
        batch["gpu_views"] = gpu.result()
    return batch


class TrainStream(IterableDataset):
    """Infinite, deterministic, resumable stream of augmented train batches for one rank.

    Batching happens inside the dataset: wrap it with :func:`make_train_loader` (``batch_size=None``).
    Each batch is a dict: ``"image"`` uint8 ``[B, C, H, W]`` (view 0), ``"image_t"`` (view 1, only when
    two views are asked), ``"label"`` int64 ``[B]``, ``"index"`` int64 ``[B]`` (stable sample index),
    ``"key"`` list of str, ``"corrupt"`` int (samples dropped from this batch) and ``"step"`` int (the
    global step the batch belongs to). Views: ``"aug"`` Inception crop (+ flip), ``"aug2"`` a second,
    independently drawn crop/flip of the same image, ``"center"`` the eval transform of the same image.
    With ``stored`` (soft labels), each sample's ``"aug"`` view is not drawn but replayed from the labels (one of
    their K views, picked per pass), and the batch carries the teacher's stored top-N as ``"soft_probs"``
    (float16 ``[B, N]``) and ``"soft_classes"`` (int64 ``[B, N]``), or, from a label set of every class's logit,
    ``"soft_logits"`` (float16 ``[B, C]``).
    See the module docstring for the determinism contract. ``decode="gpu"``: colour JPEGs are not decoded here;
    their bytes and views (drawn, or replayed from stored labels) travel as ``"gpu_views"``
    (:class:`~kd_cluster.data.gpu_decode.EncodedViews`) and their rows of the images are filled by
    :class:`~kd_cluster.data.gpu_decode.GpuDecoder` on the device.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        start_step: int,
        augment: AugmentParams,
        views: tuple[str, ...] = ("aug",),
        storage_options: dict[str, Any] | None = None,
        stored: StoredViews | None = None,
        decode: str = "cpu",
    ) -> None:
        super().__init__()
        _check_placement(manifest, batch_size, rank, world_size)
        if decode not in ("cpu", "gpu"):
            raise DataError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
        if stored is not None:
            if tuple(views) != ("aug",):
                raise DataError(f"{manifest.url}: a stream over stored labels has one view ('aug'), got {views!r}")
            stored.check(manifest)
        self.stored = stored
        if num_workers < 0 or start_step < 0:
            raise DataError(f"{manifest.url}: num_workers and start_step must be >= 0, got {num_workers}, {start_step}")
        self.manifest = manifest
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.start_step = start_step
        self.augment = augment
        self.views = check_views(views)
        self.storage_options = storage_options
        self.decode = decode
        n_shards = len(manifest.shards)
        if n_shards < self.num_splits:
            raise DataError(
                f"{manifest.url} has {n_shards} shards, but world_size={world_size} x max(1, num_workers="
                f"{num_workers}) = {self.num_splits} streams need at least {self.num_splits} shards "
                "(rebuild the split with a smaller shard_size, or use fewer workers)"
            )
        self.shards_per_split = n_shards // self.num_splits
        if all(manifest.shards[j].count == 0 for j in range(n_shards)):
            raise DataError(f"{manifest.url}: every shard is empty")

    @property
    def virtual_workers(self) -> int:
        """``W = max(1, num_workers)``."""
        return max(1, self.num_workers)

    @property
    def num_splits(self) -> int:
        """``S = world_size * W``: the number of disjoint per-(rank, worker) streams."""
        return self.world_size * self.virtual_workers

    def pass_shards(self, split_id: int, epoch: int) -> list[int]:
        """Manifest positions of the shards split ``split_id`` reads in pass ``epoch``, in reading order."""
        perm = seeded_rng(SeedTag.SHARD_PERMUTATION, self.seed, epoch).permutation(len(self.manifest.shards))
        return [int(j) for j in perm[split_id :: self.num_splits][: self.shards_per_split]]

    def _positions(self, split_id: int, start: int) -> Iterator[tuple[int, int, int]]:
        """``(epoch, shard position, position in shard)`` of the split's raw sequence from raw position ``start``."""
        counts = [s.count for s in self.manifest.shards]
        epoch, skip = 0, start
        while True:
            shards = self.pass_shards(split_id, epoch)
            length = sum(counts[j] for j in shards)
            if skip >= length:  # whole pass skipped arithmetically (an empty pass is skipped too)
                skip -= length
                epoch += 1
                continue
            for j in shards:
                if skip >= counts[j]:
                    skip -= counts[j]
                    continue
                order = seeded_rng(SeedTag.SAMPLE_PERMUTATION, self.seed, epoch, j).permutation(counts[j])
                for q in range(skip, counts[j]):
                    yield epoch, j, int(order[q])
                skip = 0
            epoch += 1

    def _virtual_worker(self, v: int) -> Iterator[Batch]:
        w = self.virtual_workers
        k = max(0, -(-(self.start_step - v) // w))  # k0: steps s' < start_step with s' % W == v
        positions = self._positions(self.rank * w + v, k * self.batch_size)
        cache = _ShardCache(self.manifest, self.storage_options)
        while True:
            items: list[_Item] = []
            for _ in range(self.batch_size):
                epoch, j, p = next(positions)
                items.append((j, p, cache.get(j)[p], (self.seed, epoch, j, p)))
            batch = _decode_batch(items, self.views, self.augment, self.manifest, self.stored, self.decode)
            batch["step"] = k * w + v
            yield batch
            k += 1

    def __iter__(self) -> Iterator[Batch]:
        w = self.virtual_workers
        info = get_worker_info()
        if info is None:
            streams = [self._virtual_worker((self.start_step + i) % w) for i in range(w)]
            while True:
                for stream in streams:
                    yield next(stream)
        if info.num_workers != w:
            raise DataError(
                f"TrainStream over {self.manifest.url} was built for num_workers={self.num_workers} but runs in a "
                f"DataLoader with {info.num_workers} workers; build the loader with make_train_loader"
            )
        yield from self._virtual_worker((self.start_step + info.id) % w)


def make_train_loader(stream: TrainStream, *, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """The DataLoader for a :class:`TrainStream`: no re-batching, in-order, persistent workers.

    Take ONE iterator from it per run: every new ``iter(loader)`` starts again at ``stream.start_step``.
    To resume elsewhere, build a new stream with the new ``start_step``.
    """
    if num_workers != stream.num_workers:
        raise DataError(
            f"make_train_loader(num_workers={num_workers}) for a TrainStream over {stream.manifest.url} built "
            f"with num_workers={stream.num_workers}; they must match (the worker count is part of the data order)"
        )
    return _Loader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        pin_memory=pin_memory,
        in_order=True,
        worker_init_fn=_ignore_sigterm,
    )


def make_eval_loader(stream: EvalStream, *, num_workers: int) -> DataLoader:
    """The DataLoader for an :class:`EvalStream`, built once per stage: its worker processes persist, and
    every ``iter(loader)`` is a new full pass (the workers start their pass again).

    Call :func:`start_workers` on it before anything network-bound runs in background threads of this
    process: forking later, while a Ray/gRPC call is in flight, can crash the training process (gRPC's
    fork handlers stop its pollers in the parent mid-call).
    """
    return _Loader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
                   worker_init_fn=_ignore_sigterm)


def start_workers(loader: DataLoader) -> None:
    """Fork ``loader``'s persistent worker processes now rather than at its first pass."""
    if loader.num_workers > 0 and loader.persistent_workers:
        iter(loader)


def _ignore_sigterm(_worker_id: int) -> None:
    """Loader processes leave SIGTERM to the training process, which checkpoints and then stops them
    (a process-group SIGTERM, as a VM shutdown sends, must not kill the data feed mid-checkpoint)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# Iterators of loaders whose worker processes ignore SIGTERM. Python's multiprocessing stops leftover
# daemon processes at exit with SIGTERM and then waits for them without a limit, so a process that
# exits while such an iterator is still referenced (by an exception's traceback, say) would hang.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


class _Loader(DataLoader):
    """A DataLoader whose multi-process iterators can be closed, and are closed at interpreter exit.

    Its workers are forked with every object of the training process frozen out of the cyclic garbage
    collector (``gc.freeze``), so a collection in a worker never runs finalizers of objects it inherited:
    in a process that is also a Ray driver or worker those include gRPC and Ray handles, whose teardown in a
    forked child can corrupt its heap.
    """

    def _get_iterator(self) -> Any:
        if self.num_workers == 0:
            return super()._get_iterator()
        ours = gc.get_freeze_count() == 0  # a process that froze objects itself keeps its own arrangement
        if ours:
            gc.freeze()
        try:
            it = super()._get_iterator()  # forks the workers
        finally:
            if ours:
                gc.unfreeze()
        _LIVE.add(it)
        return it


def close_loader(loader: Any, timeout_s: float = 5.0) -> None:
    """Stop the worker processes of ``loader`` (a DataLoader from this module, or an iterator of one) now;
    idempotent. Workers are asked to finish, and killed if still alive after ``timeout_s`` (they ignore
    SIGTERM, so terminating them would not do)."""
    it = loader
    if isinstance(loader, DataLoader):
        it, loader._iterator = loader._iterator, None
    if it is None or not hasattr(it, "_shutdown_workers"):
        return
    workers = list(getattr(it, "_workers", ()))
    it._shutdown_workers()
    for w in workers:
        w.join(timeout_s)
        if w.is_alive():
            w.kill()
            w.join(timeout_s)
    _LIVE.discard(it)


@atexit.register
def _close_loaders_at_exit() -> None:
    for it in list(_LIVE):
        try:
            close_loader(it, timeout_s=2.0)
        except Exception:  # noqa: BLE001 - exiting anyway: never turn an exit into a hang or a traceback
            log.debug("closing a data loader at exit failed", exc_info=True)


class EvalStream(IterableDataset):
    """One deterministic pass over a split with the eval (center) view, for one rank.

    Number the samples of the split ``0..N-1`` in manifest order (shard by shard, tar order inside);
    rank ``r`` takes positions ``r, r + world_size, ...`` and yields them in order in batches of
    ``batch_size`` (the last may be smaller), as the same dict as :class:`TrainStream` without
    ``"image_t"`` and ``"step"``. Works for any shard count. Under a DataLoader with ``n`` workers,
    worker ``i`` produces batches ``i, i + n, ...``, so the in-order loader yields the same sequence.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        augment: AugmentParams,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_placement(manifest, batch_size, rank, world_size)
        self.manifest = manifest
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.augment = augment
        self.storage_options = storage_options
        self._starts = np.cumsum([0] + [s.count for s in manifest.shards]).tolist()
        self.num_positions = max(0, -(-(manifest.num_samples - rank) // world_size))  # this rank's share

    def __len__(self) -> int:
        """Number of batches this rank yields."""
        return -(-self.num_positions // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        cache = _ShardCache(self.manifest, self.storage_options)
        for b in range(worker, len(self), n_workers):
            items: list[_Item] = []
            for t in range(b * self.batch_size, min((b + 1) * self.batch_size, self.num_positions)):
                g = self.rank + t * self.world_size
                j = bisect.bisect_right(self._starts, g) - 1
                p = g - self._starts[j]
                items.append((j, p, cache.get(j)[p], ()))
            yield _decode_batch(items, ("center",), self.augment, self.manifest)
