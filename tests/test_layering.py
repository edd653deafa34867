"""The layering rule: only kd_cluster.cluster imports ray; only kd_cluster.telemetry imports wandb (lazily)."""

from __future__ import annotations

import subprocess
import sys

import pytest

RAY_FREE = ["kd_cluster.config", "kd_cluster.models", "kd_cluster.data", "kd_cluster.methods", "kd_cluster.optim",
            "kd_cluster.teacher", "kd_cluster.train", "kd_cluster.storage", "kd_cluster.telemetry", "kd_cluster.results"]


@pytest.mark.parametrize("module", RAY_FREE)
def test_module_does_not_import_ray_or_wandb(module: str) -> None:
    code = (f"import sys, {module}\n"
            "bad = [m for m in ('ray', 'wandb') if m in sys.modules]\n"
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"{module} imported {r.stdout.strip()}"


def test_config_imports_neither_torch_nor_ray() -> None:
    r = subprocess.run([sys.executable, "-c", "import sys, kd_cluster.config; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
