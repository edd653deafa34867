"""data.decode: gpu on the CPU: the loader draws the very same crop boxes and flips as the CPU path, the device-side
step renders them like the CPU path does, falls back per sample, and validation names the field without CUDA."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kd_cluster.data.augment as augment_mod
from kd_cluster.config import SpecError, load_job
from kd_cluster.data import AugmentParams, Manifest, TrainStream, ViewParams, write_split
from kd_cluster.bench.data import photo_like_jpeg
from kd_cluster.data.gpu_decode import EncodedViews, GpuDecoder, pil_window_decode, render_views_torch
from kd_cluster.train import check_here, plan_job

CLASSES = ["a", "b"]


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_split(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """Colour JPEGs (the GPU's), and a grayscale JPEG, a CMYK JPEG and a PNG in every shard (the CPU's)."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        kind = i % 6
        w, h = int(rng.integers(90, 160)), int(rng.integers(70, 130))
        colour = Image.open(io.BytesIO(photo_like_jpeg(rng, w, h)))
        data, ext = {3: (_encoded(colour.convert("L"), "JPEG"), "jpg"), 4: (_encoded(colour, "PNG"), "png"),
                     5: (_encoded(colour.convert("CMYK"), "JPEG"), "jpg")}.get(kind, (_encoded(colour, "JPEG"), "jpg"))
        samples.append((data, ext, i % 2))
    root = tmp_path_factory.mktemp("mixed")
    return write_split(samples, str(root), name="mixed", split="train", classes=CLASSES, channels=3, shard_size=6,
                       progress=False)


def _stream(m: Manifest, decode: str, views: tuple[str, ...]) -> TrainStream:
    return TrainStream(m, batch_size=4, seed=3, rank=1, world_size=2, num_workers=2, start_step=5,
                       augment=AugmentParams(image_size=48, crop_scale=(0.2, 1.0)), views=views, decode=decode)


@pytest.mark.parametrize("views", [("aug",), ("aug", "aug2"), ("aug", "center")])
def test_gpu_decode_draws_the_same_views_as_the_cpu_path(mixed_split: Manifest, views: tuple[str, ...],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, list[ViewParams]]] = []  # what the loader rendered, in row order
    render = augment_mod.render_views

    def recording(data: bytes, vs: list[ViewParams], params: AugmentParams, out: list[np.ndarray]) -> None:
        calls.append((bytes(data), list(vs)))
        render(data, vs, params, out)

    monkeypatch.setattr(augment_mod, "render_views", recording)
    cpu_batches = [b for _, b in zip(range(6), _stream(mixed_split, "cpu", views), strict=False)]
    cpu_rows, calls[:] = list(calls), []
    gpu_batches = [b for _, b in zip(range(6), _stream(mixed_split, "gpu", views), strict=False)]
    gpu_fallbacks = iter(list(calls))
    cpu_it = iter(cpu_rows)
    n_gpu = 0
    for cb, gb in zip(cpu_batches, gpu_batches, strict=True):
        assert cb["step"] == gb["step"] and cb["key"] == gb["key"] and torch.equal(cb["label"], gb["label"])
        ev: EncodedViews = gb["gpu_views"]
        for row in range(len(cb["key"])):
            data, cpu_views = next(cpu_it)
            if row in ev.rows:  # shipped encoded: the same bytes, and the very boxes and flips the CPU path drew
                i = ev.rows.index(row)
                assert ev.data(i).tobytes() == data and ev.view_params(i) == cpu_views
                n_gpu += 1
            else:  # grayscale, CMYK, PNG: rendered by the loader, as on the CPU
                assert next(gpu_fallbacks) == (data, cpu_views)
                assert torch.equal(gb["image"][row], cb["image"][row])
                if len(views) > 1:
                    assert torch.equal(gb["image_t"][row], cb["image_t"][row])
    colour_jpegs = sum(Image.open(io.BytesIO(d)).format == "JPEG" and Image.open(io.BytesIO(d)).mode == "RGB"
                       for d, _ in cpu_rows)
    assert n_gpu == colour_jpegs > 0  # the colour JPEGs went to the GPU, and nothing else
    assert next(gpu_fallbacks, None) is None


def test_the_device_step_renders_like_the_cpu_path(mixed_split: Manifest) -> None:
    cpu = iter(_stream(mixed_split, "cpu", ("aug", "center")))
    gpu = iter(_stream(mixed_split, "gpu", ("aug", "center")))
    aug = AugmentParams(image_size=48, crop_scale=(0.2, 1.0))
    step = GpuDecoder(torch.device("cpu"), aug, pil_window_decode)
    shipped = 0
    for _ in range(3):
        cb, gb = next(cpu), next(gpu)
        shipped += len(gb["gpu_views"])
        gb = step(gb)
        assert "gpu_views" not in gb and gb["image"].dtype == torch.uint8
        for k in ("image", "image_t"):
            diff = (gb[k].int() - cb[k].int()).abs().float()
            assert diff.mean() < 3.0, (k, diff.mean())  # other decoder and resampler, the same crops and flips
    assert step.gpu_decoded == shipped > 0 and step.cpu_fallbacks == 0


def test_render_views_torch_matches_pil_box_resizes() -> None:
    rng = np.random.default_rng(1)
    img = Image.open(io.BytesIO(photo_like_jpeg(rng, 200, 150))).convert("RGB")
    boxes = [(10.0, 20.0, 190.0, 140.0), (50.0, 30.0, 80.0, 60.0), (0.0, 0.0, 200.0, 150.0)]  # shrink, enlarge, all
    window = (0, 0, 200, 150)
    out = render_views_torch([torch.from_numpy(np.asarray(img).copy())], [window],
                             torch.tensor([boxes], dtype=torch.float64), torch.tensor([[False, True, False]]), 64)
    for v, box in enumerate(boxes):
        ref = img.resize((64, 64), Image.Resampling.BILINEAR, box=box)
        if v == 1:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        diff = np.abs(out[0, v].permute(1, 2, 0).numpy().astype(int) - np.asarray(ref).astype(int))
        assert diff.mean() < 1.5, (box, diff.mean())


def test_refused_images_fall_back_to_the_cpu_and_undecodable_ones_are_dropped() -> None:
    rng = np.random.default_rng(2)
    good = photo_like_jpeg(rng, 64, 48)
    aug = AugmentParams(image_size=16)
    vs = [ViewParams((4.0, 4.0, 40.0, 40.0), True)]
    ev = EncodedViews.build([0, 1, 2], [good, good, b"\xff\xd8 not really a jpeg"], [vs, vs, vs], 1)
    batch = {"image": torch.zeros(3, 3, 16, 16, dtype=torch.uint8), "label": torch.tensor([0, 1, 0]),
             "index": torch.tensor([7, 8, 9]), "key": ["a", "b", "c"], "corrupt": 0, "gpu_views": ev}

    def refuses_the_second(data: list[np.ndarray], windows: list[tuple[int, int, int, int]]) -> list:
        out = pil_window_decode(data, windows)
        return [out[0], None, out[2]]

    step = GpuDecoder(torch.device("cpu"), aug, refuses_the_second)
    out = step(batch)
    assert out["key"] == ["a", "b"] and out["corrupt"] == 1 and out["index"].tolist() == [7, 8]
    ref = np.empty((3, 16, 16), np.uint8)
    augment_mod.render_views(good, vs, aug, [ref])
    assert torch.equal(out["image"][1], torch.from_numpy(ref))  # the CPU fallback is the CPU path itself
    assert (out["image"][0].int() - out["image"][1].int()).abs().float().mean() < 4
    assert (step.gpu_decoded, step.cpu_fallbacks) == (1, 1)


def test_decode_gpu_is_validated_and_needs_cuda_where_the_job_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_job("jobs/demo.yaml", ["data.decode=gpu"])
    with pytest.raises(SpecError, match=r"data\.decode: 'gpu' decodes on the training workers' GPUs"):
        plan_job(spec, "jobs/demo.yaml", check_data="none")
    with pytest.raises(SpecError, match="data.decode"):
        load_job("jobs/demo.yaml", ["data.decode=gpus"])
    spec = load_job("jobs/demo.yaml", ["data.decode=gpu", "resources.use_gpu=true"])
    plans = plan_job(spec, "jobs/demo.yaml", check_data="none")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match=r"data\.decode: 'gpu' needs a CUDA device .* this machine has none"):
        check_here(plans, "jobs/demo.yaml")
    check_here(plan_job(load_job("jobs/demo.yaml"), "jobs/demo.yaml", check_data="none"), "jobs/demo.yaml")


def test_views_replayed_from_stored_labels_travel_as_given() -> None:
    from kd_cluster.data.gpu_decode import GpuBatchBuilder

    rng = np.random.default_rng(3)
    colour, gray = photo_like_jpeg(rng, 80, 60), _encoded(Image.new("L", (80, 60), 90), "JPEG")
    replayed = [ViewParams((3.0, 5.0, 50.0, 41.0), True)]
    builder = GpuBatchBuilder(("aug",), AugmentParams(image_size=16))
    assert builder.take(0, colour, (0, 0, 0, 0), replayed) and not builder.take(1, gray, (0, 0, 0, 1), replayed)
    ev = builder.result()
    assert ev.rows == [0] and ev.view_params(0) == replayed and ev.data(0).tobytes() == colour
