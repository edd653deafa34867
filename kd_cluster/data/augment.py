"""Decoding and augmentation of one image into uint8 CHW views, and batch-level mixup.

Speed: the image is opened lazily, every view's crop box is computed in original pixel coordinates,
then ``Image.draft`` lets libjpeg decode at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves
at least ``image_size`` pixels across every crop, and each view is one ``resize(box=...)``. No float
conversion happens in the loader.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import simplejpeg
from PIL import Image

from ._util import SeedTag, seeded_rng
from .errors import DataError

if TYPE_CHECKING:  # only mixup takes tensors, and calls no torch function: drawing views needs no torch
    import torch

VIEWS = ("aug", "aug2", "center")
"""View names: Inception crop (+ flip), a second independent one, and the eval (center) transform."""
_VIEW_TAGS = {"aug": 0, "aug2": 1}

Box = tuple[float, float, float, float]

MAX_IMAGE_PIXELS = 89_478_485
"""The largest image (width x height, from its header) decoded; PIL's own warning threshold. Above it a sample
is a decompression bomb (a small file that decodes to a gigantic canvas) and is skipped as corrupt before any
pixel is allocated."""


class ImageTooLarge(ValueError):
    """An image whose header claims more than :data:`MAX_IMAGE_PIXELS` pixels."""


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"the image claims {width} x {height} pixels, more than {MAX_IMAGE_PIXELS}: "
                            "not decoded (a decompression bomb, or an image to shrink with --max-side)")


def _open_header(data: bytes) -> Image.Image:
    """PIL's lazy open (reads the header only); PIL's own bomb warning is replaced by :func:`_check_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    _check_pixels(*img.size)
    return img


@dataclass(frozen=True)
class AugmentParams:
    """How images are turned into network input."""

    image_size: int
    """Output side length in pixels."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Inception-style random-resized-crop range of the crop area, as a fraction of the image area."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the crop aspect ratio (width / height), sampled log-uniformly."""
    flip: bool = True
    """Random horizontal flip with probability 1/2 in the train views."""
    eval_resize_ratio: float = 256 / 224
    """Eval view: resize the shorter side to ``int(image_size * ratio)``, then center-crop ``image_size``."""
    channels: int = 3
    """Decode mode: 1 -> ``"L"``, 3 -> ``"RGB"``."""

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise DataError(f"AugmentParams.image_size must be >= 1, got {self.image_size}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise DataError(f"AugmentParams.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise DataError(f"AugmentParams.crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        if self.eval_resize_ratio < 1.0:
            raise DataError(f"AugmentParams.eval_resize_ratio must be >= 1, got {self.eval_resize_ratio}")
        if self.channels not in (1, 3):
            raise DataError(f"AugmentParams.channels must be 1 or 3, got {self.channels}")

    @property
    def mode(self) -> str:
        """PIL mode of the output."""
        return "L" if self.channels == 1 else "RGB"


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """Validate a views tuple (one or two distinct names from :data:`VIEWS`)."""
    views = tuple(views)
    if not 1 <= len(views) <= 2 or len(set(views)) != len(views) or not set(views) <= set(VIEWS):
        raise DataError(
            f"views must be one or two distinct names from {list(VIEWS)}, got {views!r} "
            "(use 'aug2' for a second independent random crop)"
        )
    return views


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> Box:
    """Inception crop box ``(left, top, right, bottom)`` in pixels, as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, image_size: int, resize_ratio: float) -> Box:
    """Box in original pixels equal to Resize(int(image_size * ratio)) on the shorter side + CenterCrop(image_size)."""
    resized_short = max(int(image_size * resize_ratio + 1e-6), image_size)  # 224 * (256/224) -> 256, not 255
    side = min(width, height) * image_size / resized_short
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def _fast_jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg can read, else None."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height


def _fast_jpeg_decode(data: bytes, mode: str, request: tuple[int, int] | None) -> Image.Image | None:
    """Decode with libjpeg-turbo's fast integer IDCT and fast chroma upsampling, optionally DCT-downscaled.

    Both shortcuts are what training input pipelines commonly use; they change pixel values by a few
    levels at most and cut decode time by about a fifth. None when simplejpeg refuses the data.
    """
    min_w, min_h = request or (0, 0)
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB", fastdct=True,
                                     fastupsample=True, min_width=min_w, min_height=min_h)
    except ValueError:
        return None
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr, mode)


@dataclass(frozen=True)
class ViewParams:
    """Where one view comes from in the original image: a crop box in original pixels, and a horizontal flip."""

    box: Box
    flip: bool = False


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image from its header, without decoding its pixels."""
    fast = _fast_jpeg_header(data)
    if fast is not None:
        _check_pixels(*fast)
        return fast
    with _open_header(data) as img:
        return img.size


def draw_views(width: int, height: int, views: Sequence[str], params: AugmentParams,
               seed_parts: tuple[int, ...]) -> list[ViewParams]:
    """The crop box and flip of each requested view of a ``width`` x ``height`` image.

    The random views draw from a generator seeded by ``(*seed_parts, view tag)``; "center" is deterministic.
    This is the one place where augmentation parameters are drawn, whoever decodes the image.
    """
    out = []
    for view in views:
        if view == "center":
            out.append(ViewParams(center_crop_box(width, height, params.image_size, params.eval_resize_ratio)))
        else:
            rng = seeded_rng(SeedTag.AUGMENT, *seed_parts, _VIEW_TAGS[view])
            box = random_resized_crop_box(width, height, params.crop_scale, params.crop_ratio, rng)
            out.append(ViewParams(box, bool(params.flip and rng.random() < 0.5)))
    return out


def render_views(data: bytes, views: Sequence[ViewParams], params: AugmentParams, out: Sequence[np.ndarray]) -> None:
    """Decode an encoded image once and write each view (its box resized to ``image_size``, flipped when asked)
    into ``out[v]`` (uint8 ``[C, S, S]``). Raises whatever PIL raises for an undecodable image."""
    fast = _fast_jpeg_header(data)
    img = None if fast is not None else _open_header(data)
    width, height = fast if fast is not None else img.size
    _check_pixels(width, height)
    boxes = [v.box for v in views]
    mode = params.mode
    # Largest allowed reduction keeps >= image_size pixels across the smallest crop side of any view.
    reduction = min(min(b[2] - b[0], b[3] - b[1]) for b in boxes) / params.image_size
    request = None
    if reduction >= 2:
        request = (max(1, math.ceil(width / reduction)), max(1, math.ceil(height / reduction)))
    if fast is not None:
        img = _fast_jpeg_decode(data, mode, request)
        if img is None:  # something simplejpeg does not take (CMYK, arithmetic coding, damage): PIL decides
            img = _open_header(data)
    if img.format == "JPEG":
        img.draft(mode, request)
    if img.size[0] != width:  # decoded at a reduced scale (DCT-domain downscaling)
        f = img.size[0] / width
        # the reduced sides are rounded up separately, so f can overshoot the height by a fraction of a pixel
        boxes = [(b[0] * f, b[1] * f, b[2] * f, min(b[3] * f, img.size[1])) for b in boxes]
    if img.mode not in ("L", "RGB"):
        img = img.convert(mode)  # palette, alpha, CMYK, 16-bit: normalise before resampling
    size = (params.image_size, params.image_size)
    for k, (box, view) in enumerate(zip(boxes, views, strict=True)):
        view_img = img.resize(size, Image.Resampling.BILINEAR, box=box)
        if view_img.mode != mode:
            view_img = view_img.convert(mode)
        if view.flip:
            view_img = view_img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(view_img)
        out[k][...] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_views(
    data: bytes,
    views: Sequence[str],
    params: AugmentParams,
    seed_parts: tuple[int, ...],
    out: Sequence[np.ndarray],
) -> None:
    """Decode an encoded image once and write each requested view into ``out[v]`` (uint8 ``[C, S, S]``):
    :func:`draw_views` then :func:`render_views`. Raises whatever PIL raises for an undecodable image."""
    width, height = image_size(data)
    render_views(data, draw_views(width, height, views, params, seed_parts), params, out)


def mixup_lambda(seed: int, step: int, alpha: float) -> float:
    """The mixup weight of global step ``step``: ``max(lam, 1 - lam)`` with ``lam ~ Beta(alpha, alpha)``.

    Drawn from a generator seeded by ``(seed, step)`` only, so it is the same on every rank and in a
    resumed run. ``alpha == 0`` disables mixup (returns 1.0).
    """
    if alpha < 0:
        raise DataError(f"mixup alpha must be >= 0, got {alpha}")
    if alpha == 0:
        return 1.0
    lam = float(seeded_rng(SeedTag.MIXUP, seed, step).beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def mixup(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * x + (1 - lam) * x.roll(1, dims=0)``: each sample is mixed with the previous one in the batch.

    Integer input (the uint8 batch) is promoted to float32; float input keeps its dtype.
    """
    if not x.is_floating_point():
        x = x.float()
    return lam * x + (1.0 - lam) * x.roll(1, dims=0)
