"""resources.compile: torch.compile of the student and the teacher, with a one-warning fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kd_cluster.config import load_job
from kd_cluster.models import CompiledModule, build_model, maybe_compile
from kd_cluster.teacher import ColocatedTeacher


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> None:
    raise RuntimeError("this compiler cannot take it")


def test_a_failing_compiler_warns_once_and_the_model_runs_uncompiled() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    wrapped = CompiledModule(model, "student", backend=_failing_backend)
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1, out2 = wrapped(x), wrapped(x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch.compile of the student failed" in messages[0]
    assert "this compiler cannot take it" in messages[0] and wrapped.failed
    assert torch.equal(out1, model(x)) and torch.equal(out2, model(x))


def test_compiled_module_shares_parameters_mode_and_gradients_with_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    wrapped = CompiledModule(model, "student", backend="eager")  # dynamo tracing without code generation
    assert [p is q for p, q in zip(wrapped.parameters(), model.parameters(), strict=True)] == [True, True, True, True]
    x = torch.randn(5, 4)
    wrapped(x).sum().backward()
    assert not wrapped.failed and model[0].weight.grad is not None
    wrapped.eval()
    assert not model.training and torch.allclose(wrapped(x), model(x))
    assert maybe_compile(model, False, "student") is model


def test_compiled_teacher_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    net = build_model("cnn_xs", num_classes=10, in_chans=1)
    plain = ColocatedTeacher(net, torch.device("cpu"))
    compiled = ColocatedTeacher(net, torch.device("cpu"))
    compiled.model = CompiledModule(compiled.model, "teacher", backend="eager")
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(plain(x)[0], compiled(x)[0], atol=1e-6)


def test_resources_compile_is_a_job_field(tmp_path: pytest.TempPathFactory) -> None:
    spec = load_job("jobs/demo.yaml", ["resources.compile=true"])
    assert spec.resources.compile is True and load_job("jobs/demo.yaml").resources.compile is False
