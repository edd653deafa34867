"""How long the commands that need no training take, from the shell prompt to the exit (a fresh interpreter each).

    python tests/benchmarks/cli_startup.py [--rounds 7] [--before PATH]

``--before PATH``: another checkout of kd_cluster (e.g. ``git worktree add /tmp/kdc-before <commit>``), timed in
the same rounds, alternating with this one, so that both see the same machine load. Prints the median wall
time of each command and the load average before and after. The run folder that ``status`` and ``runs``
read is written here (a spec, one finished stage, a checkpoint of the next), not trained.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
ENTRY = "import sys; from kd_cluster.cli import main; sys.exit(main())"  # what the kd-cluster script runs


def make_run(storage: Path) -> None:
    """A run folder as a two-stage run leaves it mid-way, written with the config and storage layers only."""
    import json

    sys.path.insert(0, str(HERE))
    from kd_cluster.config import load_job
    from kd_cluster.storage import CheckpointStore, Store

    spec = load_job(HERE / "jobs" / "demo.yaml", ["name=startup", f"storage.path={storage}"])
    run = Store(str(storage / "startup"))
    run.write_json("job.json", {"source": "jobs/demo.yaml", "saved_at": "-", "spec": json.loads(spec.model_dump_json())})
    Store(run.url("teacher")).write_json("stage.json", {"steps": 400, "wall_s": 90.0,
                                                        "final_metrics": {"eval/student_top1": 0.98}})
    ck = CheckpointStore(Store(run.url("distill")))
    ck.write_file(800, "state.pt", b"-")
    ck.commit(800, keep=2)


def time_once(checkout: Path, args: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", ENTRY, *args], cwd=checkout, env=env, capture_output=True)
    return time.perf_counter() - t0, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", type=Path, default=None, help="another checkout to time alongside this one")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp) / "runs"
        make_run(storage)
        subprocess.run([sys.executable, "-c", "from kd_cluster.data import load_manifest; "
                        "load_manifest('builtin://mnist5k/train')"], env={**os.environ, "PYTHONPATH": str(HERE)},
                       check=True)  # the demo's digits are built once, as after a first run
        commands = {
            "--help": ["--help"],
            "status RUN --storage PATH": ["status", "startup", "--storage", str(storage)],
            "status RUN --storage (missing path)": ["status", "startup", "--storage", str(Path(tmp) / "nowhere")],
            "runs --storage PATH": ["runs", "--storage", str(storage)],
            "validate jobs/demo.yaml": ["validate", "jobs/demo.yaml"],
            "schema": ["schema"],
        }
        expected = {name: 2 if "missing" in name else 0 for name in commands}  # the missing run: exit 2 by design
        checkouts = {"this": HERE, **({"before": a.before.resolve()} if a.before else {})}
        times: dict[tuple[str, str], list[float]] = {}
        codes: dict[tuple[str, str], int] = {}
        load0 = os.getloadavg()
        for _ in range(a.rounds):
            for name, args in commands.items():
                for label, checkout in checkouts.items():
                    t, rc = time_once(checkout, args)
                    times.setdefault((name, label), []).append(t)
                    codes[name, label] = rc
        load1 = os.getloadavg()
    print(f"median wall seconds of {a.rounds} rounds, fresh interpreter each; load average "
          f"{'/'.join(f'{x:.1f}' for x in load0)} -> {'/'.join(f'{x:.1f}' for x in load1)} ({os.cpu_count()} CPUs)")
    head = f"{'command':40s}" + "".join(f"{label:>12s}" for label in checkouts)
    print(head + ("       ratio" if a.before else ""))
    for name in commands:
        cells = []
        for label in checkouts:
            med = statistics.median(times[name, label])
            ok = codes[name, label] == expected[name]
            cells.append(f"{med:12.2f}" if ok else f"{'n/a (rc ' + str(codes[name, label]) + ')':>12s}")
        ratio = ""
        if a.before and codes[name, "before"] == expected[name]:
            ratio = f"{statistics.median(times[name, 'before']) / statistics.median(times[name, 'this']):11.1f}x"
        print(f"{name:40s}" + "".join(cells) + ratio)


if __name__ == "__main__":
    main()
