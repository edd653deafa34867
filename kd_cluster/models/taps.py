"""Feature taps by layer name, checked when the model is wrapped (torch.fx, no forward hooks).

A tap is a node name from ``feature_node_names(model)`` (e.g. ``"layer3.1.relu_1"``) or the name of a
module (e.g. ``"layer3"``, ``"stage2"``), which stands for the last node inside that module, as in
torchvision's ``create_feature_extractor``. Because taps are graph outputs rather than hooks, they
keep working under DDP and torch.compile.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from kd_cluster.models.errors import ModelError

MAX_LISTED = 30


def _tracer_kwargs(model: nn.Module) -> dict[str, Any]:
    # timm declares modules/functions that FX must not trace through; torchvision and our CNNs need nothing.
    if type(model).__module__.startswith("timm."):
        from timm.models import get_notrace_functions, get_notrace_modules

        return {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    return {}


@dataclass(frozen=True)
class _Graph:
    """What one trace (train or eval mode) tells us."""

    nodes: list[str]
    """Node names in execution order."""
    output: str
    """The node whose value the model returns (the logits)."""


def _trace(model: nn.Module, training: bool) -> _Graph:
    from torchvision.models.feature_extraction import NodePathTracer

    was_training = model.training
    model.train(training)
    try:
        tracer = NodePathTracer(**_tracer_kwargs(model))
        graph = tracer.trace(model)
    except Exception as exc:  # FX raises many kinds (TraceError, TypeError on data-dependent control flow, ...)
        raise ModelError(
            f"{type(model).__name__} cannot be traced with torch.fx ({type(exc).__name__}: {exc}), "
            "so it cannot have feature taps; use a model without taps or a traceable one"
        ) from exc
    finally:
        model.train(was_training)
    output_node = next(n for n in graph.nodes if n.op == "output")
    result = output_node.args[0]
    output = tracer.node_to_qualname.get(result) if isinstance(result, fx.Node) else None
    if output is None:
        raise ModelError(
            f"{type(model).__name__} in {'train' if training else 'eval'} mode does not return a single "
            "logits tensor (a tuple or other structure?); TappedModel needs a model whose forward returns logits"
        )
    return _Graph(nodes=list(tracer.node_to_qualname.values()), output=output)


def feature_node_names(model: nn.Module) -> list[str]:
    """Node names of ``model`` usable as feature taps, in execution order (traced in eval mode).

    Module names that are dotted prefixes of these (e.g. ``"layer3"`` for ``"layer3.1.relu_1"``) are
    accepted by ``TappedModel`` too. Raises ModelError if the model cannot be traced with torch.fx.
    """
    return _trace(model, training=False).nodes


def _module_prefixes(nodes: Sequence[str]) -> list[str]:
    """Node names and their dotted prefixes, in first-seen order."""
    seen: dict[str, None] = {}
    for node in nodes:
        parts = node.split(".")
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def _resolve_tap(tap: str, nodes: Sequence[str]) -> str | None:
    """The node a tap stands for: itself, or the last node inside the module it names."""
    if tap in nodes:
        return tap
    inside = [n for n in nodes if n.startswith(tap + ".")]
    return inside[-1] if inside else None


def _unknown_tap_message(model: nn.Module, tap: str, nodes: Sequence[str], mode: str) -> str:
    names = _module_prefixes(nodes)
    close = difflib.get_close_matches(tap, names, n=5, cutoff=0.6)
    top = [n for n in names if "." not in n and n not in close][: MAX_LISTED - len(close)]
    message = f"unknown feature tap {tap!r} for {type(model).__name__} ({mode} graph)"
    if close:
        message += f"; close matches: {', '.join(close)}"
    message += (
        f"; top-level names: {', '.join(top)}; any node name from feature_node_names(model) "
        f"({len(nodes)} nodes) or a module name that prefixes them is allowed"
    )
    return message


@dataclass(frozen=True)
class _Outputs:
    """Which key of the extractor's output dict holds the logits and each tap, in one mode."""

    logits: str
    taps: dict[str, str]


class TappedModel(nn.Module):
    """Wraps a classifier so that ``forward(x)`` returns ``(logits, {tap: feature})``.

    Built with torchvision's ``create_feature_extractor`` (an FX graph returning the taps and the
    output node), so the model runs once per forward. Taps are checked here, in both train and eval
    graphs; an unknown tap raises ModelError listing close matches and names that exist.

    The wrapped model is the only registered child (``self.model``): parameters are shared with the
    graph, ``state_dict()`` keys are ``"model." + the model's keys``, and ``save_weights(tapped, ...)``
    writes the plain model weights. The TappedModel starts in the model's mode; switch modes on the
    TappedModel (``.train()``/``.eval()``), which selects the train or eval graph.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str]) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        if isinstance(taps, str) or not isinstance(taps, Sequence) or not all(isinstance(t, str) for t in taps):
            raise ModelError(f"taps must be a list of layer names, got {taps!r}")
        self.model = model
        self.taps: tuple[str, ...] = tuple(dict.fromkeys(taps))
        return_nodes: dict[str, dict[str, str]] = {}
        outputs: dict[str, _Outputs] = {}
        for mode in ("train", "eval"):
            graph = _trace(model, training=mode == "train")
            resolved: dict[str, str] = {}
            for tap in self.taps:
                node = _resolve_tap(tap, graph.nodes)
                if node is None:
                    raise ModelError(_unknown_tap_message(model, tap, graph.nodes, mode))
                resolved[tap] = node
            # Exact node names as both query and output key: one entry per node, even when a tap is
            # the output node or two taps name the same node.
            nodes = [*resolved.values(), graph.output]
            return_nodes[mode] = {n: n for n in nodes}
            outputs[mode] = _Outputs(logits=graph.output, taps=resolved)
        self._outputs = outputs
        extractor = create_feature_extractor(
            model,
            train_return_nodes=return_nodes["train"],
            eval_return_nodes=return_nodes["eval"],
            tracer_kwargs=_tracer_kwargs(model),
            suppress_diff_warning=True,
        )
        # Not registered as a child: its modules are the model's, and state_dict() should list them once.
        object.__setattr__(self, "_extractor", extractor)
        self.train(model.training)  # a frozen teacher wrapped in eval mode stays in eval mode

    @property
    def extractor(self) -> fx.GraphModule:
        """The FX graph module that computes logits and taps (shares its modules with ``self.model``)."""
        return self._extractor

    def train(self, mode: bool = True) -> TappedModel:
        """Set train/eval mode on the model and select the matching graph."""
        super().train(mode)
        self._extractor.train(mode)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TappedModel:
        # .to()/.cuda()/.half(): also reach tensors the graph holds directly (get_attr nodes). Applying
        # the same conversion twice to the shared modules is a no-op.
        super()._apply(fn, recurse)
        self._extractor._apply(fn, recurse)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the tapped features (keyed by the tap names as given) of a batch."""
        keys = self._outputs["train" if self.training else "eval"]
        out = self._extractor(x)
        return out[keys.logits], {tap: out[node] for tap, node in keys.taps.items()}

    def extra_repr(self) -> str:
        """Show the taps in ``repr``."""
        return f"taps={list(self.taps)}"


def check_taps(arch: str, taps: Sequence[str]) -> None:
    """Raise ModelError (listing close and existing names) if model ``arch`` lacks any of ``taps``.

    Builds the model on the CPU once (no weights) and traces it; used to validate job files.
    """
    from kd_cluster.models.registry import build_model

    TappedModel(build_model(arch, num_classes=10), taps)
