"""Export a trained model with everything needed to use it: ONNX, TorchScript or safetensors.

ONNX and TorchScript files take the uint8 image batch (N, C, H, W) of the eval view (shorter side resized to
``int(image_size * eval_resize_ratio)``, center crop ``image_size``) and normalise it themselves, so they carry
their preprocessing; they return logits (N, classes). The batch axis is dynamic. A safetensors file holds the
plain weights (normalisation is the user's: ``(x / 255 - mean) / std``).

Every format carries the same metadata (input size, channels, mean/std, class names, the run, stage and
teacher it came from, the stage's final metrics): ONNX ``metadata_props``, TorchScript extra file
``kd_cluster.json``, the safetensors header's ``__metadata__``; and a JSON sidecar ``<out>.json``. Each
export is checked by loading the written file back and comparing it with the torch model on a real batch of
the split (ONNX through onnxruntime); above the tolerance the command fails and nothing is left at ``out``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kd_cluster
from kd_cluster.results.store import write_file
from kd_cluster.results.target import ModelRef

FORMATS: tuple[str, ...] = ("onnx", "torchscript", "safetensors")
META_KEY = "kd_cluster"
"""ONNX metadata prop / TorchScript extra file (``.json``) / safetensors metadata key of the full metadata."""


class ExportCheckFailed(RuntimeError):
    """The exported file does not reproduce the torch model within the tolerance."""


class WithPreprocessing(nn.Module):
    """uint8 images (N, C, H, W) -> logits: normalisation inside the graph."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.norm = (list(mean), list(std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image.float() - self.mean) * self.inv_std)


def metadata(ref: ModelRef, fmt: str, classes: list[str], channels: int, mean: list[float],
             std: list[float]) -> dict[str, Any]:
    """What a user of the exported model needs to know, and where it came from."""
    p = ref.preprocess
    inside = fmt != "safetensors"
    return {
        "format": fmt, "producer": f"kd-cluster {kd_cluster.__version__}",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arch": ref.arch, "num_classes": len(classes), "classes": classes,
        "input": {"name": "image", "dtype": "uint8" if inside else "float32", "layout": "NCHW", "channels": channels,
                  "height": p.image_size, "width": p.image_size, "batch": "dynamic",
                  "resize": f"shorter side to int({p.image_size} * {p.eval_resize_ratio}), center crop {p.image_size}",
                  "eval_resize_ratio": p.eval_resize_ratio},
        "normalization": {"mean": mean, "std": std, "space": "pixels / 255",
                          "applied": "inside the model: feed uint8 pixels" if inside
                          else "by the user: feed (pixels / 255 - mean) / std"},
        "output": {"name": "logits", "shape": ["batch", len(classes)]},
        "source": ref.origin(),
        "final_metrics": ref.final_metrics,
    }


def _flat(meta: dict[str, Any]) -> dict[str, str]:
    """String-valued metadata entries (ONNX props, safetensors header): the whole record plus the common keys."""
    inp, norm = meta["input"], meta["normalization"]
    return {META_KEY: json.dumps(meta, sort_keys=True), "arch": meta["arch"], "classes": json.dumps(meta["classes"]),
            "input_size": f"{inp['channels']}x{inp['height']}x{inp['width']}", "input_dtype": inp["dtype"],
            "mean": json.dumps(norm["mean"]), "std": json.dumps(norm["std"]),
            "run": str(meta["source"]["run"]), "stage": str(meta["source"]["stage"]),
            "teacher": json.dumps(meta["source"]["teacher"])}


def _onnx(wrapped: nn.Module, example: torch.Tensor, path: str, meta: dict[str, Any], opset: int) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(wrapped, (example,), path, input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False)
        except Exception as exc:
            raise RuntimeError(f"ONNX export of {meta['arch']} failed: {exc}\n{log.getvalue()}") from exc
    model = onnx.load(path)
    for k, v in _flat(meta).items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name = "kd-cluster"
    onnx.save(model, path)


def _torchscript(wrapped: nn.Module, example: torch.Tensor, path: str, meta: dict[str, Any]) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; still what many runtimes load
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(wrapped, example, check_trace=False)
        torch.jit.save(scripted, path, _extra_files={f"{META_KEY}.json": json.dumps(meta, sort_keys=True)})


def _safetensors(model: nn.Module, path: str, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path, metadata=_flat(meta))


def check(fmt: str, path: str, wrapped: WithPreprocessing, batch: torch.Tensor,
          rebuild: Callable[[], nn.Module]) -> dict[str, Any]:
    """Run the written file on ``batch`` (uint8) and on a batch of one; the largest |difference| from torch.

    ``rebuild``: a freshly initialised model of the same architecture, into which a safetensors file is loaded."""
    with torch.no_grad():
        ref = wrapped(batch).numpy()
        ref1 = wrapped(batch[:1]).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": batch.numpy()})[0]
        got1 = sess.run(None, {"image": batch[:1].numpy()})[0]  # the dynamic batch axis
        runtime = f"onnxruntime {ort.__version__}"
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notice of torch.jit
            loaded = torch.jit.load(path)
        with torch.no_grad():
            got, got1 = loaded(batch).numpy(), loaded(batch[:1]).numpy()
        runtime = f"torch.jit {torch.__version__}"
    else:
        from kd_cluster.models import load_weights

        fresh = rebuild()
        load_weights(fresh, path)  # strict: every key, every shape
        reloaded = WithPreprocessing(fresh.eval(), *wrapped.norm)
        with torch.no_grad():
            got, got1 = reloaded(batch).numpy(), reloaded(batch[:1]).numpy()
        runtime = "safetensors reloaded into torch"
    if got.shape != ref.shape or got1.shape != ref1.shape:
        raise ExportCheckFailed(f"{fmt}: output shapes {got.shape}/{got1.shape}, torch gives {ref.shape}/{ref1.shape}")
    diff = float(max(np.abs(got - ref).max(), np.abs(got1 - ref1).max()))
    same_top1 = float((got.argmax(1) == ref.argmax(1)).mean())
    return {"runtime": runtime, "batch": int(batch.shape[0]), "max_abs_diff": diff, "top1_agreement": same_top1}


def export(ref: ModelRef, fmt: str, out: str, *, data: str, data_endpoint_url: str | None = None,
           out_endpoint_url: str | None = None, tolerance: float = 1e-3, opset: int = 18,
           check_batch: int = 64) -> dict[str, Any]:
    """Export ``ref`` to ``out`` (a local path or any fsspec URL) in ``fmt``, with its metadata and the JSON
    sidecar ``<out>.json``; checked on ``check_batch`` real images of the split at ``data``.

    Returns the sidecar's content (the metadata plus the check's result and where the files are)."""
    from kd_cluster.data import AugmentParams, EvalStream, load_manifest
    from kd_cluster.models import build_model, load_weights
    from kd_cluster.storage import storage_options

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    manifest = load_manifest(data, storage_options(data, data_endpoint_url))
    classes, channels = list(manifest.classes), manifest.channels
    def rebuild() -> nn.Module:
        return build_model(ref.arch, num_classes=len(classes), in_chans=channels)

    model = rebuild()
    load_weights(model, ref.weights, storage_options=storage_options(ref.weights, ref.endpoint_url))
    model.eval().requires_grad_(False)
    mean, std = ref.preprocess.normalization(channels)
    wrapped = WithPreprocessing(model, mean, std).eval()
    aug = AugmentParams(image_size=ref.preprocess.image_size, eval_resize_ratio=ref.preprocess.eval_resize_ratio,
                        channels=channels)
    stream = EvalStream(manifest, batch_size=min(check_batch, manifest.num_samples), rank=0, world_size=1,
                        augment=aug, storage_options=storage_options(data, data_endpoint_url))
    batch = next(iter(stream))["image"]
    meta = metadata(ref, fmt, classes, channels, mean, std)
    with tempfile.TemporaryDirectory(prefix="kdc-export-") as tmp:
        local = os.path.join(tmp, Path(out.rstrip("/")).name or f"model.{fmt}")
        if fmt == "onnx":
            _onnx(wrapped, batch, local, meta, opset)
        elif fmt == "torchscript":
            _torchscript(wrapped, batch, local, meta)
        else:
            _safetensors(model, local, meta)
        result = check(fmt, local, wrapped, batch, rebuild)
        result["tolerance"] = tolerance
        if not result["max_abs_diff"] <= tolerance:
            raise ExportCheckFailed(f"{fmt} export of {ref.label} differs from torch by {result['max_abs_diff']:.3g} "
                                    f"(max |logit difference| on {result['batch']} images of {data}), above "
                                    f"--tolerance {tolerance:g}; nothing was written")
        size = os.path.getsize(local)
        url = write_file(out, Path(local).read_bytes(), out_endpoint_url)
    sidecar = {**meta, "file": url, "bytes": size, "check": result, "check_data": data}
    sidecar_url = write_file(f"{out}.json", json.dumps(sidecar, indent=2).encode(), out_endpoint_url)
    return {**sidecar, "sidecar": sidecar_url}


__all__ = ["FORMATS", "META_KEY", "ExportCheckFailed", "WithPreprocessing", "check", "export", "metadata"]
