"""The layering rules: only kd_cluster.cluster imports ray; only kd_cluster.telemetry imports wandb (lazily); the
teacher seam never reaches into the training loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import``/``from ... import`` in the file names, at any depth (lazy imports included),
    relative imports resolved against the file's package."""
    package = ".".join(path.relative_to(Path(__file__).resolve().parents[1]).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            found += [(node.lineno, f"{mod}.{a.name}" if not node.module else mod) for a in node.names]
    return found


def test_teacher_package_never_imports_the_training_loop() -> None:
    """Teachers are what the loop calls (kd_cluster/teacher/base.py); if one imported kd_cluster.train, a new
    placement could come to depend on the loop's internals, and the loop's refactors would break placements."""
    root = Path(__file__).resolve().parents[1] / "kd_cluster" / "teacher"
    bad = [f"{p.name}:{line} imports {mod}" for p in sorted(root.glob("*.py"))
           for line, mod in _imported_modules(p) if mod == "kd_cluster.train" or mod.startswith("kd_cluster.train.")]
    assert not bad, bad
