"""The layering rules: Ray only in kd_cluster.cluster and kd_cluster.bench; wandb only in kd_cluster.telemetry
(lazily); imports run down the layers and never in a cycle; every measurement lives in kd_cluster.bench; the
teacher seam never reaches into the training loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kd_cluster"

LAYERS = ["kd_cluster", "urls", "config", "storage", "telemetry", "models", "data", "methods", "optim", "teacher",
          "train", "results", "cluster", "bench", "cli"]
"""Bottom to top: a module may import its own package and the packages below it, never one above. ``kd_cluster``
is the package's own ``__init__`` (its version); ``urls`` is the one URL module every layer resolves paths with."""

RAY_PACKAGES = {"cluster", "bench"}
"""The packages that may import Ray; every other one must import without it (the same loop then runs in one
process, on machines without Ray)."""


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if p.name == "__init__.py" else parts)] = p
    return out


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import``/``from ... import`` in the file names, at any depth (lazy imports included),
    relative imports resolved against the file's package; ``from a import b`` names ``a.b``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the kd_cluster modules it imports (a name resolved to the longest module it starts with)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name not in mods:
            if "." not in name:
                return None
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        targets = {resolve(name) for _, name in _imported_modules(path) if name.startswith("kd_cluster")}
        graph[mod] = {t for t in targets if t and t != mod}
    return graph


def test_every_package_has_a_layer() -> None:
    missing = sorted({_layer(m) for m in _modules()} - set(LAYERS))
    assert not missing, f"packages without a place in LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(f"kd_cluster.{layer}" for layer in LAYERS[1:-1]
                                          if layer not in RAY_PACKAGES))
def test_module_does_not_import_ray_or_wandb(module: str) -> None:
    code = (f"import sys, {module}\n"
            "bad = [m for m in ('ray', 'wandb') if m in sys.modules]\n"
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"{module} imported {r.stdout.strip()}"


def test_ray_is_imported_only_in_its_packages() -> None:
    """At any depth: a lazy ``import ray`` in a function of another layer would still tie that layer to Ray."""
    bad = [f"{m}:{line} imports {name}" for m, p in _modules().items() if _layer(m) not in RAY_PACKAGES
           for line, name in _imported_modules(p) if name == "ray" or name.startswith("ray.")]
    assert not bad, bad


def test_config_imports_neither_torch_nor_ray() -> None:
    r = subprocess.run([sys.executable, "-c", "import sys, kd_cluster.config; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_imports_run_down_the_layers() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    up = sorted(f"{a} imports {b}" for a, targets in _import_graph().items() for b in targets
                if rank[_layer(b)] > rank[_layer(a)])
    assert not up, up


def test_the_import_graph_has_no_cycle() -> None:
    """Lazy imports count: a cycle of them still means neither module can be understood (or moved) alone."""
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_measurement_code_lives_in_the_bench_package() -> None:
    """Benchmarks, the fidelity benchmark and the GPU planner are modules of kd_cluster.bench; nothing below it
    imports it; the CLI only parses and prints (no loop of it calls into the benchmarks, and it keeps no
    statistics of its own)."""
    mods = _modules()
    misplaced = sorted(m for m in mods if _layer(m) != "bench"
                       and any(word in m.rsplit(".", 1)[-1] for word in ("bench", "fidelity", "planner")))
    assert not misplaced, misplaced
    users = sorted(f"{a} imports {b}" for a, targets in _import_graph().items() for b in targets
                   if _layer(b) == "bench" and _layer(a) not in ("bench", "cli"))
    assert not users, users
    cli = ast.parse(mods["kd_cluster.cli"].read_text())
    assert not [line for line, name in _imported_modules(mods["kd_cluster.cli"]) if name.startswith("statistics")]
    for fn in (n for n in cli.body if isinstance(n, ast.FunctionDef)):
        bench_names = {a.asname or a.name for node in ast.walk(fn) if isinstance(node, ast.ImportFrom)
                       and (node.module or "").startswith("kd_cluster.bench") for a in node.names}
        for loop in (n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While, ast.comprehension))):
            called = {n.func.value.id if isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                      else getattr(n.func, "id", None) for n in ast.walk(loop) if isinstance(n, ast.Call)}
            assert not called & bench_names, f"cli.{fn.name}:{loop.lineno} loops over {sorted(called & bench_names)}"


def test_teacher_package_never_imports_the_training_loop() -> None:
    """Teachers are what the loop calls (kd_cluster/teacher/base.py); if one imported kd_cluster.train, a new
    placement could come to depend on the loop's internals, and the loop's refactors would break placements."""
    bad = [f"{m}:{line} imports {name}" for m, p in _modules().items() if _layer(m) == "teacher"
           for line, name in _imported_modules(p) if name == "kd_cluster.train" or name.startswith("kd_cluster.train.")]
    assert not bad, bad
