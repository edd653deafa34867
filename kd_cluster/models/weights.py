"""Load and save model weights at any fsspec URI (local path, s3://, gs://, memory://, ...)."""

from __future__ import annotations

import io
import os
import pickle
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from kd_cluster.models.digest import weights_sha256  # noqa: F401  (re-exported)
from kd_cluster.models.errors import ModelError

NESTED_KEYS = ("state_dict", "model", "student")
"""Keys under which a checkpoint may nest the state dict, tried in this order."""
STRIP_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DistributedDataParallel and torch.compile."""
MAX_LISTED = 10


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP/DataParallel (``.module``), torch.compile (``._orig_mod``) and TappedModel
    (``.model``) wrappers, so saved weights never carry wrapper prefixes."""
    from kd_cluster.models.taps import TappedModel

    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch._dynamo's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, TappedModel):
            model = model.model
        else:
            return model


def load_weights(model: nn.Module, uri: str, *, storage_options: dict[str, Any] | None = None,
                 allow_missing: bool = False) -> None:
    """Load weights from ``uri`` into ``model`` in place (strict: every key must match, with its shape).

    ``allow_missing``: keys of the model absent from the file keep their values (a method's modules
    partly trained by an earlier stage); unexpected keys and shape mismatches are still errors.

    ``model`` may be wrapped in DDP, torch.compile or TappedModel; the weights go into the plain model.

    ``uri`` is a local path or any fsspec URL. A ``.safetensors`` file is read with safetensors, anything
    else with ``torch.load(weights_only=True)`` onto the CPU. The file may hold a plain state dict or a
    checkpoint that nests it under ``"state_dict"``, ``"model"`` or ``"student"``; ``module.`` (DDP) and
    ``_orig_mod.`` (torch.compile) prefixes are removed. Raises ModelError if the file is missing or
    unreadable, or if its keys or shapes do not fit the model (listing what is missing, unexpected,
    or of the wrong shape).
    """
    data = _read_bytes(uri, storage_options)
    state = _deserialize(data, uri)
    state = _find_state_dict(state, uri)
    target = _unwrap(model)
    own = target.state_dict()
    state = _strip_prefixes(state, own)
    if allow_missing:
        if not any(k in own for k in state):
            raise ModelError(f"weights at {uri!r} share no key with the model (file keys: "
                             f"{', '.join(list(state)[:MAX_LISTED])})")
        own = {k: v for k, v in own.items() if k in state}
    _check_fits(state, own, uri)
    target.load_state_dict(state, strict=not allow_missing)


def save_weights(model: nn.Module, uri: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Save ``model``'s state dict as safetensors at ``uri`` (which must end in ``.safetensors``).

    DDP, torch.compile and TappedModel wrappers are looked through: the file holds the plain model's keys.

    Local paths are written to a temporary name in the same folder and renamed, so a reader never sees
    half a file; object stores (s3://, gs://) write a whole object in one request anyway. Local parent
    folders are created; a missing bucket raises ModelError.
    """
    import safetensors.torch

    if not uri.endswith(".safetensors"):
        raise ModelError(f"save_weights writes safetensors; the URI must end in '.safetensors', got {uri!r}")
    state = _standalone_tensors(_unwrap(model).state_dict())
    data = safetensors.torch.save(state, metadata={"format": "pt"})
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        # Object stores need no folders (and s3fs.makedirs would create a missing bucket): local only.
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        try:
            fs.pipe_file(path, data)
        except FileNotFoundError as exc:  # e.g. the bucket does not exist
            raise ModelError(f"cannot write weights to {uri!r}: {exc}") from exc


def _standalone_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors that each own exactly their storage: safetensors refuses tied, sliced or strided ones."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            out[name] = t.contiguous().cpu()  # a fresh copy
            continue
        storage = t.untyped_storage()
        owns = t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
        if not owns or storage.data_ptr() in seen:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _read_bytes(uri: str, storage_options: dict[str, Any] | None) -> bytes:
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise ModelError(f"weights not found at {uri!r}") from exc
    except IsADirectoryError as exc:
        raise ModelError(f"weights URI {uri!r} is a folder; give the path of a .safetensors or .pt file") from exc


def _deserialize(data: bytes, uri: str) -> Any:
    if uri.endswith(".safetensors"):
        import safetensors.torch

        try:
            return safetensors.torch.load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
            raise ModelError(f"cannot read safetensors weights at {uri!r}: {exc}") from exc
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ModelError(
            f"cannot read weights at {uri!r} with torch.load(weights_only=True): {exc}; "
            "expected a state dict saved with torch.save, or a file ending in .safetensors"
        ) from exc


def _find_state_dict(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(obj)[:MAX_LISTED])
            raise ModelError(
                f"weights at {uri!r} are not a state dict (tensor values) and nest none under "
                f"{', '.join(repr(k) for k in NESTED_KEYS)}; top-level keys: {keys}"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ModelError(f"weights at {uri!r} hold a {type(obj).__name__}, expected a state dict (name -> tensor)")
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in own):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    # A compiled submodule leaves "._orig_mod." inside the key.
    return {k.replace("._orig_mod.", "."): v for k, v in state.items()}


def _check_fits(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], uri: str) -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    parts = [f"weights at {uri!r} do not fit the model"]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
        if items:
            more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:MAX_LISTED])}{more}")
    raise ModelError("; ".join(parts))
