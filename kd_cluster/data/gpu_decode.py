"""GPU decoding (``data.decode: gpu``): the loader ships bytes and crop parameters, the training worker decodes.

Loader side (:func:`gpu_eligible`, :class:`EncodedViews`): for each sample the loader processes read the bytes,
read the image size from the header and draw the crop boxes and flips with
:func:`~kd_cluster.data.augment.draw_views`, exactly as the CPU path does (same seed parts, same draws), so the
parameters of a sample do not depend on who decodes it. Colour JPEGs are shipped encoded, with their
:class:`~kd_cluster.data.augment.ViewParams`; anything else (grayscale or CMYK JPEGs, PNG, a 1-channel dataset) is
rendered on the CPU in the loader, per sample, as with ``decode: cpu``.

Training-worker side (:class:`GpuDecoder`, one step between the loader and the rest of the loop): the shipped
JPEGs of a batch are decoded in one batched call of nvImageCodec, each only inside the window that holds all of
its views' boxes (region-of-interest decoding), then every view is cropped, resized to ``image_size`` and
flipped on the GPU (:func:`render_views_torch`), and written into the batch's uint8 images on the device. A
JPEG the GPU decoder refuses is rendered on the CPU in the training process with the same parameters; one that
no decoder takes is dropped from the batch and counted as corrupt, as in the loader.

Resampling: a view's box is resized with ``torchvision.ops.roi_align`` (bilinear samples averaged over each
output pixel's footprint: the same geometry as PIL's box resize, and antialiased when shrinking). Pixel values
differ from the CPU path's by a few levels (other IDCT, chroma upsampling and filter); the parameters do not.

nvImageCodec is the optional ``gpu`` extra (``pip install 'kd-cluster[gpu]'``): ``nvidia-nvimgcodec-cu13`` with
its nvJPEG wheel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from .augment import AugmentParams, ViewParams, draw_views, render_views
from .errors import DataError

log = logging.getLogger(__name__)

GPU_COLORSPACES = ("YCbCr", "RGB")
"""JPEG colour spaces the GPU path takes (from the header); others are rendered on the CPU."""
_CHUNK = 64  # images resampled at once (bounds the padded float buffer)

Decode = Callable[[Sequence[np.ndarray], Sequence[tuple[int, int, int, int]]], list[torch.Tensor | None]]
"""``(encoded images, windows (left, top, right, bottom)) -> uint8 HWC RGB tensors of each window (None: refused)``."""


def jpeg_header(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, colour space) of a JPEG from its header; None for anything else."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height, colorspace


def gpu_eligible(header: tuple[int, int, str] | None, params: AugmentParams) -> bool:
    """Whether a sample goes to the GPU: a colour JPEG (``header`` from :func:`jpeg_header`) in a 3-channel
    dataset."""
    return header is not None and params.channels == 3 and header[2] in GPU_COLORSPACES


@dataclass
class EncodedViews:
    """The samples of one batch that the training worker decodes: which rows of the batch they fill, their
    encoded bytes (packed into one uint8 tensor, so a loader process hands them over in shared memory), and each
    view's crop box (original pixels, ``left, top, right, bottom``) and flip."""

    rows: list[int]
    blob: torch.Tensor
    """uint8: the encoded images one after another."""
    offsets: torch.Tensor
    """int64 ``[n + 1]``: sample ``i`` is ``blob[offsets[i]:offsets[i + 1]]``."""
    boxes: torch.Tensor
    """float64 ``[n, views, 4]``."""
    flips: torch.Tensor
    """bool ``[n, views]``."""

    @staticmethod
    def build(rows: list[int], data: list[bytes], views: list[list[ViewParams]], n_views: int) -> EncodedViews:
        offsets = np.cumsum([0] + [len(d) for d in data])
        blob = torch.from_numpy(np.frombuffer(b"".join(data), dtype=np.uint8).copy())
        boxes = torch.tensor([[list(v.box) for v in vs] for vs in views], dtype=torch.float64).reshape(-1, n_views, 4)
        flips = torch.tensor([[v.flip for v in vs] for vs in views], dtype=torch.bool).reshape(-1, n_views)
        return EncodedViews(list(rows), blob, torch.from_numpy(offsets.astype(np.int64)), boxes, flips)

    def __len__(self) -> int:
        return len(self.rows)

    def data(self, i: int) -> np.ndarray:
        """The encoded bytes of sample ``i`` (a uint8 array viewing the blob)."""
        return self.blob.numpy()[int(self.offsets[i]):int(self.offsets[i + 1])]

    def view_params(self, i: int) -> list[ViewParams]:
        """The :class:`ViewParams` of sample ``i`` (as :func:`~kd_cluster.data.augment.draw_views` drew them)."""
        return [ViewParams(tuple(float(c) for c in b), bool(f))  # type: ignore[arg-type]
                for b, f in zip(self.boxes[i].tolist(), self.flips[i].tolist(), strict=True)]

    def windows(self) -> list[tuple[int, int, int, int]]:
        """Per sample, the integer window ``(left, top, right, bottom)`` that holds every view's box: the region
        the decoder decodes (boxes lie inside the image, so the window does too)."""
        lo = self.boxes[:, :, :2].amin(dim=1).floor()
        hi = self.boxes[:, :, 2:].amax(dim=1).ceil()
        out = []
        for i in range(len(self.rows)):
            x0, y0 = max(0, int(lo[i, 0])), max(0, int(lo[i, 1]))
            out.append((x0, y0, max(int(hi[i, 0]), x0 + 1), max(int(hi[i, 1]), y0 + 1)))
        return out


class GpuBatchBuilder:
    """Loader side of ``decode: gpu`` for one batch: :meth:`take` decides per sample whether the GPU decodes it
    (then records its bytes and the views :func:`~kd_cluster.data.augment.draw_views` drew for it) or the CPU
    path renders it now (returns False)."""

    def __init__(self, views: Sequence[str], params: AugmentParams) -> None:
        self.views, self.params = tuple(views), params
        self.rows: list[int] = []
        self.data: list[bytes] = []
        self.params_of: list[list[ViewParams]] = []

    def take(self, row: int, data: bytes, seed_parts: tuple[int, ...], given: list[ViewParams] | None = None) -> bool:
        """Ship sample ``row`` encoded when it is a colour JPEG, with ``given`` views (replayed from stored labels)
        or the ones drawn for ``seed_parts``; False: the caller renders it on the CPU."""
        header = jpeg_header(data)
        if not gpu_eligible(header, self.params):
            return False
        assert header is not None
        self.params_of.append(list(given) if given is not None else
                              draw_views(header[0], header[1], self.views, self.params, seed_parts))
        self.rows.append(row)
        self.data.append(data)
        return True

    def result(self) -> EncodedViews:
        return EncodedViews.build(self.rows, self.data, self.params_of, len(self.views))


def render_views_torch(images: Sequence[torch.Tensor], windows: Sequence[tuple[int, int, int, int]],
                       boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop, resize and flip every view of decoded windows, on the images' device.

    ``images[i]``: uint8 HWC (or HW) pixels of window ``windows[i]`` of image ``i``; ``boxes`` ``[n, V, 4]`` in
    original pixels; returns uint8 ``[n, V, C, size, size]``.
    """
    from torchvision.ops import roi_align

    n, n_views = boxes.shape[:2]
    assert len(images) == len(windows) == n
    device = images[0].device
    dtype = torch.float32  # half precision would round box coordinates of large images to 0.25-0.5 pixel
    chans = images[0].shape[2] if images[0].dim() == 3 else 1
    out = torch.empty((n, n_views, chans, size, size), dtype=torch.uint8, device=device)
    for start in range(0, n, _CHUNK):
        idx = range(start, min(n, start + _CHUNK))
        hmax = max(images[i].shape[0] for i in idx)
        wmax = max(images[i].shape[1] for i in idx)
        # replicate the edges into the padding: samples near a window's border see its own pixels, not zeros
        padded = torch.stack([F.pad((images[i] if images[i].dim() == 3 else images[i][..., None])
                                    .permute(2, 0, 1).to(dtype)[None],
                                    (0, wmax - images[i].shape[1], 0, hmax - images[i].shape[0]),
                                    mode="replicate")[0] for i in idx])
        origin = torch.tensor([[windows[i][0], windows[i][1], windows[i][0], windows[i][1]] for i in idx],
                              dtype=torch.float64)
        rel = (boxes[start:start + len(idx)] - origin[:, None, :]).reshape(-1, 4)
        batch_idx = torch.arange(len(idx), dtype=torch.float64).repeat_interleave(n_views)[:, None]
        rois = torch.cat([batch_idx, rel], dim=1).to(device=device, dtype=dtype)
        res = roi_align(padded, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        res = res.reshape(len(idx), n_views, chans, size, size)
        flip = flips[start:start + len(idx)].to(device)
        res = torch.where(flip[:, :, None, None, None], res.flip(-1), res)
        out[start:start + len(idx)] = res.float().round_().clamp_(0, 255).to(torch.uint8)
    return out


def nvimgcodec_available() -> bool:
    """Whether nvImageCodec (the ``gpu`` extra) can be imported."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


class NvImageCodecDecoder:
    """Batched JPEG decoding of windows on one CUDA device with nvImageCodec (region-of-interest decoding).

    EXIF orientation is not applied (the CPU path does not apply it either). Output: uint8 HWC RGB on the device,
    ordered on the current CUDA stream of ``device``.
    """

    def __init__(self, device: torch.device) -> None:
        try:
            from nvidia import nvimgcodec
        except ImportError:
            raise DataError("data.decode: 'gpu' needs nvImageCodec on the training workers: "
                            "pip install 'kd-cluster[gpu]'") from None
        self.nv = nvimgcodec
        self.device = device
        self.decoder = nvimgcodec.Decoder(device_id=device.index or 0)
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                              allow_any_depth=False)

    def __call__(self, data: Sequence[np.ndarray], windows: Sequence[tuple[int, int, int, int]]
                 ) -> list[torch.Tensor | None]:
        nv = self.nv
        streams = [nv.CodeStream(d).get_sub_code_stream(region=nv.Region(w[1], w[0], w[3], w[2]))
                   for d, w in zip(data, windows, strict=True)]
        stream = torch.cuda.current_stream(self.device).cuda_stream
        images = self.decoder.decode(streams, params=self.params, cuda_stream=stream)
        out: list[torch.Tensor | None] = []
        for img in images:
            t = torch.from_dlpack(img) if img is not None else None
            out.append(t.to(self.device) if t is not None and t.device != self.device else t)  # a host-decoded one
        return out


def pil_window_decode(data: Sequence[np.ndarray], windows: Sequence[tuple[int, int, int, int]]
                      ) -> list[torch.Tensor | None]:
    """A CPU stand-in for the GPU decoder (same contract: uint8 HWC RGB of each window, None when undecodable),
    with PIL: for tests and ``tests/gpu/run.sh --cpu-smoke`` on machines without CUDA."""
    import io

    from PIL import Image

    out: list[torch.Tensor | None] = []
    for d, (x0, y0, x1, y1) in zip(data, windows, strict=True):
        try:
            with Image.open(io.BytesIO(d.tobytes())) as img:
                if img.format != "JPEG" or img.mode not in ("RGB", "YCbCr"):
                    out.append(None)
                    continue
                arr = np.asarray(img.convert("RGB").crop((x0, y0, x1, y1)))
        except (OSError, ValueError):
            out.append(None)
            continue
        out.append(torch.from_numpy(arr.copy()))
    return out


class GpuDecoder:
    """The training worker's decode step for ``data.decode: gpu``: moves a batch's images to the device and
    fills the rows the loader shipped encoded (``batch["gpu_views"]``); the rest of the loop sees the uint8
    batch it always sees. ``decode`` defaults to nvImageCodec on ``device`` (tests give a CPU one)."""

    def __init__(self, device: torch.device, params: AugmentParams, decode: Decode | None = None) -> None:
        self.device = device
        self.params = params
        self.decode = decode if decode is not None else NvImageCodecDecoder(device)
        self.gpu_decoded = 0
        self.cpu_fallbacks = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ev: EncodedViews | None = batch.pop("gpu_views", None)
        keys = ["image"] + (["image_t"] if "image_t" in batch else [])
        for k in keys:
            batch[k] = batch[k].to(self.device, non_blocking=True)
        if ev is None or not ev.rows:
            return batch
        windows = ev.windows()
        decoded = self.decode([ev.data(i) for i in range(len(ev))], windows)
        ok = [i for i, img in enumerate(decoded) if img is not None]
        bad_rows: list[int] = []
        if ok:
            crops = render_views_torch([decoded[i] for i in ok], [windows[i] for i in ok], ev.boxes[ok],
                                       ev.flips[ok], self.params.image_size)
            rows = torch.tensor([ev.rows[i] for i in ok], device=self.device)
            for v, k in enumerate(keys):
                batch[k][rows] = crops[:, v]
            self.gpu_decoded += len(ok)
        for i in (i for i, img in enumerate(decoded) if img is None):
            shape = (self.params.channels, self.params.image_size, self.params.image_size)
            out = [np.empty(shape, dtype=np.uint8) for _ in keys]
            try:
                render_views(ev.data(i).tobytes(), ev.view_params(i), self.params, out)
            except Exception as exc:  # undecodable by either decoder: a corrupt sample, as in the loader
                log.debug("corrupt sample (GPU and CPU decoders refused it): %s", exc)
                bad_rows.append(ev.rows[i])
                continue
            for v, k in enumerate(keys):
                batch[k][ev.rows[i]] = torch.from_numpy(out[v]).to(self.device)
            self.cpu_fallbacks += 1
        if bad_rows:
            _drop_rows(batch, bad_rows, keys)
        return batch

    def wrap(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches, decoded."""
        for batch in batches:
            yield self(batch)


def _drop_rows(batch: dict[str, Any], rows: list[int], keys: list[str]) -> None:
    n = len(batch["key"])
    keep = [r for r in range(n) if r not in set(rows)]
    if not keep:
        raise DataError(f"every sample of a batch ({n}) is corrupt (neither the GPU nor the CPU decoder took them)")
    idx = torch.tensor(keep)
    for k in keys:
        batch[k] = batch[k][idx.to(batch[k].device)]
    for k in ("label", "index", "soft_probs", "soft_classes", "soft_logits"):
        if k in batch:
            batch[k] = batch[k][idx.to(batch[k].device)]
    batch["key"] = [batch["key"][r] for r in keep]
    batch["corrupt"] += len(rows)


def cuda_problem() -> str | None:
    """Why ``data.decode: gpu`` cannot run on this machine (no CUDA, no nvImageCodec), or None."""
    if not torch.cuda.is_available():
        return ("data.decode: 'gpu' needs a CUDA device where the job trains, and this machine has none "
                "(torch.cuda.is_available() is False); use data.decode: cpu here")
    if not nvimgcodec_available():
        return "data.decode: 'gpu' needs nvImageCodec: pip install 'kd-cluster[gpu]'"
    return None


__all__ = ["GPU_COLORSPACES", "Decode", "EncodedViews", "GpuBatchBuilder", "GpuDecoder", "NvImageCodecDecoder",
           "cuda_problem", "gpu_eligible", "jpeg_header", "nvimgcodec_available", "pil_window_decode",
           "render_views_torch"]
