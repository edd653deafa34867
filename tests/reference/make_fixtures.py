"""Regenerate tests/reference/fixtures.json: loss values of the public reference implementations on fixed tensors.

    python tests/reference/make_fixtures.py

Installs the references with ``pip install --no-deps`` into a temporary folder (nothing else on this machine is
touched) and computes each loss on seeded logits and labels:

- DIST and KD with logit standardization: torchdistill 1.1.5 (``DISTLoss``, ``LogitStdKDLoss``);
- DKD: mmrazor 1.0.0's ``DKDLoss``, the formula of the authors' mdistiller (which is not on PyPI), loaded from its
  file with a stand-in for mmrazor's registry (the rest of mmrazor needs mmengine and mmcv).

``tests/test_methods_reference.py`` compares kd_cluster's methods with the stored values, so the test suite does
not need the reference packages.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

OUT = Path(__file__).with_name("fixtures.json")
PACKAGES = ["torchdistill==1.1.5", "mmrazor==1.0.0"]
CASES = [(16, 10, 0), (7, 100, 1), (32, 10, 2)]
"""(batch, classes, seed) of each set of logits."""


def tensors(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=g) * 2.0
    teacher = torch.randn(n, c, generator=g) * 3.0 + 0.5
    labels = torch.randint(0, c, (n,), generator=g)
    return student, teacher, labels


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kdc-ref-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", tmp, *PACKAGES],
                       check=True)
        sys.path.insert(0, tmp)
        from torchdistill.losses.mid_level import DISTLoss, LogitStdKDLoss

        registry = types.ModuleType("mmrazor.registry")
        registry.MODELS = types.SimpleNamespace(register_module=lambda *a, **k: (lambda cls: cls))
        sys.modules["mmrazor"] = types.ModuleType("mmrazor")
        sys.modules["mmrazor.registry"] = registry
        spec = importlib.util.spec_from_file_location("dkd_ref", Path(tmp) / "mmrazor/models/losses/decoupled_kd.py")
        dkd_ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(dkd_ref)

        cases = []
        for n, c, seed in CASES:
            s, t, y = tensors(n, c, seed)
            io_s, io_t = {".": {"output": s}}, {".": {"output": t}}
            case = {"batch": n, "classes": c, "seed": seed, "student": s.tolist(), "teacher": t.tolist(),
                    "labels": y.tolist(), "dist": [], "kd_ls": [], "dkd": []}
            for beta, gamma, tau in ((1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (0.5, 3.0, 2.0)):
                loss = DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)(io_s, io_t)
                case["dist"].append({"beta": beta, "gamma": gamma, "temperature": tau, "value": float(loss)})
            for temperature, alpha in ((2.0, 0.5), (4.0, 0.9), (1.0, 0.1)):
                # torchdistill's alpha weighs the CE, beta the KL (times T^2): kd_cluster's kd alpha is their beta
                loss = LogitStdKDLoss(".", "output", ".", "output", temperature=temperature, alpha=1 - alpha,
                                      beta=alpha)(io_s, io_t, y)
                case["kd_ls"].append({"temperature": temperature, "alpha": alpha, "value": float(loss)})
            for alpha, beta, tau in ((1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (2.0, 1.0, 2.0)):
                loss = dkd_ref.DKDLoss(tau=tau, alpha=alpha, beta=beta)(s, t, y)
                case["dkd"].append({"alpha": alpha, "beta": beta, "temperature": tau, "value": float(loss)})
            cases.append(case)
    OUT.write_text(json.dumps({"packages": PACKAGES, "torch": torch.__version__, "cases": cases}, indent=1))
    print(f"wrote {OUT} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
