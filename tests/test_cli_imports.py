"""Commands that only read files or talk to the Jobs API answer at once: they import neither torch nor ray unless
their work needs them. Checked on the modules a command leaves in ``sys.modules``, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kd_cluster.config import load_job

ROOT = Path(__file__).resolve().parent.parent
RUN_MAIN = """import json, sys
from kd_cluster.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
print("\\nKDC-MODULES " + json.dumps({"rc": rc, "modules": sorted(sys.modules)}))
"""
HEAVY_RAY = ("ray.train", "ray.tune", "ray.data", "ray.air", "ray.util.state")


def _run(*args: str) -> tuple[int, set[str], str]:
    r = subprocess.run([sys.executable, "-c", RUN_MAIN, *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert "KDC-MODULES " in r.stdout, r.stderr[-3000:]
    out = json.loads(r.stdout.rsplit("KDC-MODULES ", 1)[1])
    return out["rc"], set(out["modules"]), r.stdout + r.stderr


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as training leaves it (spec, a finished stage, a checkpoint of the next), written without
    training; and the builtin digits built, as `validate` of the demo opens their manifests."""
    from kd_cluster.cluster import save_resolved_spec
    from kd_cluster.data import load_manifest
    from kd_cluster.storage import CheckpointStore, Store

    load_manifest("builtin://mnist5k/train")
    tmp = tmp_path_factory.mktemp("imports")
    job = tmp / "job.yaml"
    job.write_text((ROOT / "jobs" / "demo.yaml").read_text().replace("extends: base/mnist5k.yaml",
                                                                     f"extends: {ROOT / 'jobs' / 'base' / 'mnist5k.yaml'}"))
    spec = load_job(job, ["name=fast", f"storage.path={tmp / 'runs'}"])
    save_resolved_spec(spec, "job.yaml")
    Store(str(tmp / "runs" / "fast" / "teacher")).write_json("stage.json", {"steps": 400, "wall_s": 1.0,
                                                                            "final_metrics": {"eval/student_top1": 0.9}})
    ck = CheckpointStore(Store(str(tmp / "runs" / "fast" / "distill")))
    ck.write_file(400, "state.pt", b"x")
    ck.commit(400, keep=2)
    return tmp / "runs"


@pytest.mark.parametrize("args", [
    ["status", "fast", "--storage", "{storage}"],
    ["status", "nope", "--storage", "{storage}/nowhere"],
    ["runs", "--storage", "{storage}"],
    ["report", "fast", "--storage", "{storage}", "--out", "{storage}/../report.html"],
    ["schema"],
    ["validate", "jobs/demo.yaml"],
    ["--help"],
], ids=["status", "status-missing-run", "runs", "report", "schema", "validate-demo", "help"])
def test_storage_and_spec_commands_import_neither_torch_nor_ray(storage: Path, args: list[str]) -> None:
    rc, modules, out = _run(*(a.format(storage=storage) for a in args))
    assert rc == (2 if "nope" in args else 0), out[-3000:]
    assert "torch" not in modules and "ray" not in modules, sorted(m for m in modules if m.startswith(("torch", "ray")))[:20]


@pytest.mark.parametrize("args", [["list"], ["status", "kdc-x"], ["logs", "kdc-x"], ["stop", "kdc-x", "--wait", "0"]],
                         ids=["list", "status", "logs", "stop"])
def test_jobs_api_commands_import_only_the_submission_client(args: list[str]) -> None:
    rc, modules, out = _run(*args, "--address", "http://127.0.0.1:9")  # nothing listens there
    assert rc == 1 and "cannot reach the Ray Jobs API at http://127.0.0.1:9" in out, out[-3000:]
    assert "ray.job_submission" in modules and "torch" not in modules
    assert not [m for m in modules if m.startswith(HEAVY_RAY)], sorted(m for m in modules if m.startswith(HEAVY_RAY))


def test_validate_imports_torch_only_for_checks_that_build_a_model() -> None:
    """A feature method's taps are checked on the built model: that validation imports torch (and still no ray)."""
    rc, modules, out = _run("validate", "jobs/cifar100/fitnet.yaml", "--profile", "smoke")
    assert rc == 0, out[-3000:]
    assert "torch" in modules and "ray" not in modules

