"""Stored soft labels: per training sample, K augmentation views and the teacher's top-N probabilities on each (or,
with ``form: logits``, every class's logit).

Layout of a label set (any fsspec URL)::

    <labels>/labeling.json               the configuration, written first (a resumed labelling must match it)
    <labels>/<data shard name>.safetensors   one sidecar per data shard, each written once, atomically
    <labels>/labels.json                 the manifest, written last: a label set without it is unfinished

A sidecar holds, for the ``n`` samples of its data shard in tar order: ``index`` int64 ``[n]`` (the samples'
stable indices, checked when read), ``valid`` uint8 ``[n]`` (0: the sample could not be decoded when labelled),
``boxes`` uint16 ``[n, K, 4]`` (crop boxes in original pixels), ``flips`` uint8 ``[n, K]``, ``probs`` float16
``[n, K, N]`` (the teacher's N largest probabilities at temperature 1, largest first) and ``classes`` int16 (int32
above 32,767 classes) ``[n, K, N]``. Bytes per sample: ``K * (9 + 4 N) + 9`` (``K * (9 + 6 N) + 9`` with int32
classes), e.g. 4,909 for K = 100, N = 10. A label set of ``form`` ``logits`` holds ``logits`` float16 ``[n, K, C]``
(the teacher's logits, every class) instead of ``probs`` and ``classes``: ``K * (9 + 2 C) + 9`` bytes per sample.

View ``k`` of the sample at position ``p`` of shard ``j`` is drawn by :func:`label_view` from
``(seed, j, p, k)``; in pass ``e`` the training stream replays view :func:`pick_view` ``(seed, e, j, p)`` of each
sample, so a stream over stored labels is still a pure function of (seed, rank, worker, step).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ._util import SeedTag, atomic_write, seeded_rng, url_to_fs
from kd_cluster.urls import absolute, join, parent, resolve
from .augment import AugmentParams, ViewParams, draw_views
from .errors import DataError
from .manifest import Manifest, ShardInfo

LABELS_MANIFEST = "labels.json"
LABELING_CONFIG = "labeling.json"
FORMAT = "kd_cluster.soft_labels/1"
MAX_BOX = 65535
"""Crop boxes are stored as uint16: an image wider or taller than this is not labelled (marked invalid)."""
_LABEL_VIEWS = 0x50F7  # keeps the labelling draws apart from the training stream's (seed, pass, shard, position)


@dataclass(frozen=True)
class LabelConfig:
    """What a label set is made of: the teacher, the views, the data. Two label sets with the same config hold
    the same labels."""

    teacher: dict[str, Any]
    """``{"members": [{"name", "arch", "weight", "weights_sha256"}]}``: who labelled."""
    views: int
    top_k: int
    num_classes: int
    channels: int
    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip: bool
    seed: int
    data_samples: int
    """Samples of the train split that was labelled."""
    data_shards: list[int] = field(default_factory=list)
    """Sample count of each of its shards, in manifest order."""
    form: str = "topk"
    """``topk``: the top-N probabilities per view; ``logits``: every class's logit (label sets written before this
    field existed are ``topk``)."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_scale"], d["crop_ratio"] = list(self.crop_scale), list(self.crop_ratio)
        return d

    @staticmethod
    def from_json(doc: dict[str, Any]) -> LabelConfig:
        doc = dict(doc)
        doc["crop_scale"], doc["crop_ratio"] = tuple(doc["crop_scale"]), tuple(doc["crop_ratio"])
        return LabelConfig(**doc)

    def augment(self) -> AugmentParams:
        """The augmentation the views were drawn with."""
        return AugmentParams(image_size=self.image_size, crop_scale=self.crop_scale, crop_ratio=self.crop_ratio,
                             flip=self.flip, channels=self.channels)


@dataclass(frozen=True)
class LabelSet:
    """A finished label set: its config and one sidecar URL per data shard."""

    url: str
    """The manifest (``labels.json``)."""
    config: LabelConfig
    files: list[str]
    missing_mass: str = "uniform"


def sidecar_name(shard_url: str) -> str:
    """The sidecar file name of a data shard (``train-000012.tar`` -> ``train-000012.safetensors``)."""
    base = posixpath.basename(shard_url)
    return (base[:-4] if base.endswith(".tar") else base) + ".safetensors"


def labels_file_url(url: str) -> str:
    """The manifest of a label set given its folder or the manifest itself."""
    url = absolute(url)
    return url if url.endswith(".json") else join(url, LABELS_MANIFEST)


def label_view(width: int, height: int, augment: AugmentParams, seed: int, shard: int, position: int,
               k: int) -> ViewParams:
    """View ``k`` of a sample as the labeller draws it (the training view's distribution, another seed)."""
    return draw_views(width, height, ("aug",), augment, (seed, _LABEL_VIEWS, shard, position, k))[0]


def pick_view(seed: int, epoch: int, shard: int, position: int, views: int) -> int:
    """Which of the K stored views the stream replays for a sample in pass ``epoch``."""
    return int(seeded_rng(SeedTag.SOFT_LABEL_PICK, seed, epoch, shard, position).integers(views))


def label_mismatches(cfg: LabelConfig, expect: dict[str, Any], where: str) -> list[str]:
    """What differs between a label set (``cfg``, found at ``where``) and what a stage expects of it, one line per
    job field: ``expect`` holds ``archs`` (and ``arch_field``), ``weights_sha256`` (per member, None: unknown),
    ``image_size``, ``crop_scale``, ``crop_ratio``, ``flip``, ``data_shards``, ``num_classes``, ``channels``."""
    out = []
    made_by = [m["arch"] for m in cfg.teacher["members"]]
    if made_by != list(expect["archs"]):
        out.append(f"{expect['arch_field']}: the labels at {where} were made by teacher {'+'.join(made_by)}, this "
                   f"job's teacher is {'+'.join(expect['archs'])}")
    else:
        for j, (rec, digest) in enumerate(zip(cfg.teacher["members"], expect["weights_sha256"], strict=True)):
            if digest is not None and rec.get("weights_sha256") not in (None, digest):
                field = f"teacher.members[{j}].weights" if expect["arch_field"] == "teacher.members" else "teacher.weights"
                out.append(f"{field}: the labels at {where} were made with other weights of {rec['arch']} (SHA-256 "
                           f"{rec['weights_sha256'][:12]}..., this job's {digest[:12]}...)")
    for field, key in (("data.image_size", "image_size"), ("augment.crop_scale", "crop_scale"),
                       ("augment.crop_ratio", "crop_ratio"), ("augment.flip", "flip")):
        theirs, ours = cfg.to_json()[key], expect[key]
        if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != (
                list(ours) if isinstance(ours, (list, tuple)) else ours):
            out.append(f"{field}: the labels at {where} were made with {theirs}, this job has {ours} (label again "
                       "with this job, or match its setting)")
    if expect.get("data_shards") is not None and list(expect["data_shards"]) != cfg.data_shards:
        out.append(f"data.train: the labels at {where} were made for another train split ({cfg.data_samples} samples "
                   f"in {len(cfg.data_shards)} shards; this one has {sum(expect['data_shards'])} in "
                   f"{len(expect['data_shards'])})")
    elif expect.get("num_classes") and (cfg.num_classes, cfg.channels) != (expect["num_classes"], expect["channels"]):
        out.append(f"data.train: the labels have {cfg.num_classes} classes and {cfg.channels} channels, the data "
                   f"{expect['num_classes']} and {expect['channels']}")
    return out


def _read_json(url: str, storage_options: dict[str, Any] | None) -> Any | None:
    fs, path = url_to_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"malformed soft-label file {url}: not valid JSON ({e})") from None


def _write_json(url: str, doc: Any, storage_options: dict[str, Any] | None) -> None:
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):  # object stores need no folders
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with atomic_write(fs, path) as f:
        f.write(json.dumps(doc, indent=1).encode())


def read_labels(url: str, storage_options: dict[str, Any] | None = None) -> LabelSet:
    """Open a finished label set (its folder or ``labels.json``); DataError names what is wrong."""
    file_url = labels_file_url(url)
    doc = _read_json(file_url, storage_options)
    if doc is None:
        partial = _read_json(join(parent(file_url), LABELING_CONFIG), storage_options)
        hint = (" (labelling started there but did not finish: run `kd-cluster teacher label` again to complete it)"
                if partial is not None else " (write it with `kd-cluster teacher label JOB`)")
        raise DataError(f"no soft labels at {file_url}{hint}")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"malformed soft-label manifest {file_url}: expected format {FORMAT!r}")
    try:
        config = LabelConfig.from_json(doc["config"])
        files = [resolve(parent(file_url), f) for f in doc["files"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"malformed soft-label manifest {file_url}: {type(e).__name__}: {e}") from None
    if len(files) != len(config.data_shards):
        raise DataError(f"malformed soft-label manifest {file_url}: {len(files)} files for "
                        f"{len(config.data_shards)} data shards")
    return LabelSet(url=file_url, config=config, files=files, missing_mass=doc.get("missing_mass", "uniform"))


def start_labels(out: str, config: LabelConfig, storage_options: dict[str, Any] | None = None) -> None:
    """Record the configuration of a labelling in ``out`` (or check it against the one a previous, interrupted
    labelling recorded there, which it then continues)."""
    url = join(absolute(out), LABELING_CONFIG)
    have = _read_json(url, storage_options)
    if have is None:
        _write_json(url, config.to_json(), storage_options)
        return
    old = LabelConfig.from_json(have)
    if old != config:
        diff = [k for k in config.to_json() if config.to_json()[k] != old.to_json().get(k)]
        raise DataError(f"{out} holds labels of another configuration (differs in {', '.join(diff)}): give another "
                        "--out, or remove that folder")


def finish_labels(out: str, config: LabelConfig, data: Manifest,
                  storage_options: dict[str, Any] | None = None) -> LabelSet:
    """Write the manifest of a label set whose sidecars are all written; it makes the set usable."""
    out = absolute(out)
    names = [sidecar_name(s.url) for s in data.shards]
    fs, _ = url_to_fs(out, storage_options)
    missing = [n for n in names if not fs.exists(url_to_fs(join(out, n), storage_options)[1])]
    if missing:
        raise DataError(f"{out}: {len(missing)} sidecars are missing (e.g. {missing[0]}); label the missing shards first")
    doc = {"format": FORMAT, "config": config.to_json(), "files": names, "missing_mass": "uniform",
           "data": data.url}
    _write_json(join(out, LABELS_MANIFEST), doc, storage_options)
    return read_labels(out, storage_options)


def write_sidecar(url: str, arrays: dict[str, np.ndarray], storage_options: dict[str, Any] | None = None) -> int:
    """Write one shard's labels atomically (readers see the whole file or none); returns its size in bytes."""
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    fs, path = url_to_fs(url, storage_options)
    with atomic_write(fs, path) as f:
        f.write(blob)
    return len(blob)


def read_sidecar(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """One shard's labels."""
    from safetensors.numpy import load

    fs, path = url_to_fs(url, storage_options)
    try:
        return load(fs.cat_file(path))
    except FileNotFoundError:
        raise DataError(f"soft-label sidecar missing: {url}") from None


FORMS = ("topk", "logits")


@dataclass(frozen=True)
class StoredView:
    """What the stream takes from the labels for one sample: the crop to replay and the teacher's top-N (or all of
    its logits)."""

    params: ViewParams
    probs: np.ndarray | None = None
    classes: np.ndarray | None = None
    logits: np.ndarray | None = None


class StoredViews:
    """The view source of a training stream over stored labels (used in the loader processes; picklable).

    Holds the sidecar of the most recently read shard."""

    def __init__(self, labels: LabelSet, seed: int, storage_options: dict[str, Any] | None = None) -> None:
        self.labels, self.seed, self.storage_options = labels, seed, storage_options
        self._shard = -1
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def top_k(self) -> int:
        return self.labels.config.top_k

    @property
    def form(self) -> str:
        return self.labels.config.form

    def check(self, manifest: Manifest) -> None:
        """The labels belong to this split (same shards, same counts)."""
        counts = [s.count for s in manifest.shards]
        if counts != self.labels.config.data_shards:
            raise DataError(f"soft labels {self.labels.url} were made for another train split "
                            f"({len(self.labels.config.data_shards)} shards, {self.labels.config.data_samples} "
                            f"samples) than {manifest.url} ({len(counts)} shards, {manifest.num_samples} samples)")

    def view(self, shard: ShardInfo, j: int, position: int, index: int, epoch: int) -> StoredView | None:
        """The stored view to replay for a sample in pass ``epoch`` (None: not labelled, skip it as corrupt)."""
        if j != self._shard:
            self._arrays = {}
            self._arrays = read_sidecar(self.labels.files[j], self.storage_options)
            self._shard = j
        a = self._arrays
        if int(a["index"][position]) != index:
            raise DataError(f"soft labels {self.labels.files[j]} do not match shard {shard.url}: position "
                            f"{position} holds sample {index}, the labels say {int(a['index'][position])}")
        if not a["valid"][position]:
            return None
        k = pick_view(self.seed, epoch, j, position, self.labels.config.views)
        b = a["boxes"][position, k]
        box = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
        params = ViewParams(box, bool(a["flips"][position, k]))
        if self.form == "logits":
            return StoredView(params, logits=a["logits"][position, k])
        return StoredView(params, a["probs"][position, k], a["classes"][position, k])


__all__ = ["FORMAT", "LABELING_CONFIG", "LABELS_MANIFEST", "MAX_BOX", "LabelConfig", "LabelSet", "StoredView",
           "StoredViews", "finish_labels", "label_mismatches", "label_view", "labels_file_url", "pick_view",
           "read_labels",
           "read_sidecar", "sidecar_name", "start_labels", "write_sidecar"]
