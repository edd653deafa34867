"""tests/gpu/run.sh --cpu-smoke: the prepared GPU check, with tiny models on the CPU, so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "tests" / "gpu" / "run.sh"), "--cpu-smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == res  # the one JSON line is the result
    configs = {(x["workload"], x["decode"], x["compile"]) for x in res["results"]}
    assert configs == {("decode", d, False) for d in ("cpu", "gpu")} | {
        (w, d, c) for w in ("student", "teacher", "colocated") for d in ("cpu", "gpu") for c in (False, True)}
    for x in res["results"]:
        assert "error" not in x, x
        assert x["images_per_s"] > 0 and x["compile_fell_back"] == []
        assert (x["mfu"] is None) == (x["workload"] == "decode")
    fwd = res["flops_per_image_forward"]
    by = {(x["workload"], x["decode"], x["compile"]): x["flops_per_image"] for x in res["results"]}
    assert by[("colocated", "gpu", True)] == 3 * fwd["student"] + fwd["teacher"] > 0
