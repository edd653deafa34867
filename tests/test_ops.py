"""Cluster operations: submit, status, logs, list, stop and resume against a real Ray head started by the test
(its own ports and temp dir; stopped by the PIDs it started), the one-line errors, local run status and
local resume from storage, and the submission's handling of credentials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from kd_cluster.cluster import jobs_api
from kd_cluster.cluster.driver import save_resolved_spec
from kd_cluster.config import load_job
from kd_cluster.storage import CheckpointStore, Store

VENV_BIN = str(Path(sys.executable).parent)
SECRET = "kdcTESTsecretVALUE-9f8e7d6c5b4a"


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI call: rich tables unwrapped, no Ray address, and of the forwarded variables only
    what a test passes (the session's S3 fixture sets some)."""
    full = {**os.environ, "COLUMNS": "200"}
    full.pop("RAY_ADDRESS", None)
    for name in jobs_api.FORWARDED_ENV:
        full.pop(name, None)
    full.update(env or {})
    return full


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# -- the test's own Ray head -----------------------------------------------------------------------------------


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def head_pids(temp_dir: str) -> set[int]:
    """Processes of the head started with ``temp_dir`` (its daemons name the dir) and all their descendants."""
    procs = _procs()
    roots = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd and pid != os.getpid()}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


def stop_head(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, only the processes of this head; never `ray stop` (other clusters live here)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = head_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and head_pids(temp_dir):
            time.sleep(0.2)
        if not head_pids(temp_dir):
            return


def remove_head(temp_dir: str) -> None:
    """Stop this head's processes and delete its temp dir (its logs hold the runtime_env: see README, credentials);
    fail if any of its processes outlived the stop."""
    stop_head(temp_dir)
    left = head_pids(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's Ray head still alive: {sorted(left)}"


def start_head(env: dict[str, str], attempts: int = 2) -> tuple[str, int]:
    """Start a Ray head on free ports in its own temp dir; return (temp dir, dashboard port).

    Ray gives the raylet a fixed 30 s to register with the GCS (``ray/_private/node.py``), which a busy 2-core
    machine can miss now and then ("The current node timed out during startup"). A failed start is cleaned up
    (only its own processes) and tried once more on fresh ports; the error shows every attempt's output and the
    tail of its raylet log."""
    errors = []
    for _ in range(attempts):
        temp_dir = tempfile.mkdtemp(prefix="kdcray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        gcs, dash, agent, agent_grpc, client_port, rt_env, metrics, nm, om = free_ports(9)
        cmd = [f"{VENV_BIN}/ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
               "--dashboard-agent-grpc-port", str(agent_grpc), "--ray-client-server-port", str(client_port),
               "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
               "--node-manager-port", str(nm), "--object-manager-port", str(om), "--temp-dir", temp_dir,
               "--disable-usage-stats"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
            out = r.stdout + r.stderr
            ok = r.returncode == 0
        except subprocess.TimeoutExpired as exc:
            out, ok = f"ray start: no answer in {exc.timeout} s", False
        if ok:
            return temp_dir, dash
        raylet = sorted(Path(temp_dir).glob("session_*/logs/raylet.out"))
        tail = "".join(raylet[-1].read_text(errors="replace").splitlines(True)[-15:]) if raylet else "(no raylet log)"
        errors.append(f"{out[-3000:]}\nraylet.out, last lines:\n{tail}")
        remove_head(temp_dir)
    raise AssertionError(f"ray start --head failed {attempts} times:\n" + "\n---\n".join(errors))


@pytest.fixture
def ray_head(builtin_cache: Path) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with the dashboard (Jobs API), on free ports, in its own temp dir; yields its URL."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    temp_dir, dash = start_head(env)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while True:  # the Jobs API answers once the dashboard's job module is up
            try:
                jobs_api.list_jobs(url)
                break
            except jobs_api.ClusterError:
                assert time.monotonic() < deadline, "the head's Jobs API did not come up"
                time.sleep(1)
        yield url
    finally:
        remove_head(temp_dir)


def follow(sid: str, url: str, stall_s: float = 420) -> subprocess.CompletedProcess:
    """`kd-cluster logs SID --follow`, which returns when the job ends, waited on for progress rather than by the
    clock: it fails only when the job prints nothing for ``stall_s`` (on a loaded 2-core machine, starting a Ray
    Train worker group alone can take minutes; the test's own timeout bounds the whole)."""
    out_path = Path(tempfile.mkstemp(prefix="kdc-follow-")[1])
    err_path = Path(tempfile.mkstemp(prefix="kdc-follow-err-")[1])
    try:
        with out_path.open("w") as out, err_path.open("w") as err_file, subprocess.Popen(
                [sys.executable, "-m", "kd_cluster.cli", "logs", sid, "--follow", "--address", url],
                stdout=out, stderr=err_file, text=True, env=cli_env()) as proc:
            seen, last = 0, time.monotonic()
            while proc.poll() is None:
                size = out_path.stat().st_size
                if size != seen:
                    seen, last = size, time.monotonic()
                if time.monotonic() - last > stall_s:
                    proc.kill()
                    pytest.fail(f"logs --follow {sid}: no output for {stall_s:.0f} s; last output:\n"
                                f"{out_path.read_text()[-3000:]}")
                time.sleep(0.5)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out_path.read_text(), err_path.read_text())
    finally:
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three Ray Train start-ups, each minutes long on a loaded machine; waits are on progress
def test_submit_watch_stop_resume_on_a_real_head(ray_head: str, tiny_job: Any, tmp_path: Path) -> None:
    url = ray_head
    runs = tmp_path / "runs"
    # job A: one stage, 2 Ray Train workers
    job_a = tiny_job("ops-a", teacher=None, method={"name": "supervised"}, stages=[],
                     schedule={"steps": 6, "eval_every": 6, "checkpoint_every": 3})
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "KDC_EXTRA": SECRET}
    r = cli("submit", str(job_a), "--address", url, "--env", "KDC_EXTRA", "--json", env=env)
    assert r.returncode == 0, r.stderr
    sub_a = json.loads(r.stdout)
    sid_a = sub_a["submission_id"]
    assert "ops-a" in sid_a and sub_a["run"] == "ops-a" and sub_a["storage"] == str(runs / "ops-a")
    assert sub_a["wandb"] == "disabled"
    assert sub_a["env_names"] == ["AWS_SECRET_ACCESS_KEY", "KDC_EXTRA"]
    outputs = [r.stdout, r.stderr]

    r = follow(sid_a, url)  # returns when the job ends
    assert r.returncode == 0, r.stderr
    assert "run ops-a" in r.stdout and "checkpoints and artifacts" in r.stdout, r.stdout[-3000:]
    outputs.append(r.stdout)
    r = cli("status", sid_a, "--address", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "SUCCEEDED", r.stdout + r.stderr
    outputs.append(r.stdout)
    assert json.loads((runs / "ops-a" / "main" / "stage.json").read_text())["steps"] == 6
    r = cli("status", sid_a, "--address", url)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout and "ops-a" in r.stdout
    r = cli("logs", sid_a, "--address", url)
    assert r.returncode == 0 and "checkpoints and artifacts" in r.stdout

    # job B: two stages; stopped once its first stage has finished, then resumed with `kd-cluster resume`
    job_b = tiny_job("ops-b", resources={"num_workers": 1},
                     stages=[{"name": "teacher", "trains": "teacher",
                              "set": {"method": {"name": "supervised"}, "schedule": {"steps": 6}}},
                             {"name": "distill"}])
    r = cli("submit", str(job_b), "--address", url, "--json")
    assert r.returncode == 0, r.stderr
    sid_b = json.loads(r.stdout)["submission_id"]
    # the same run cannot get a second driver while the first one runs (ops-b runs two stages: well over 10 s)
    r = cli("submit", str(job_b), "--address", url)
    assert r.returncode == 1 and "already being driven" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # on progress: until the teacher stage is done, as long as the job still runs (it is slow to start under load)
    wait_for(lambda: (runs / "ops-b" / "teacher" / "stage.json").exists()
             or jobs_api.job_status(url, sid_b)["status"] not in ("PENDING", "RUNNING"), 900, "ops-b's teacher stage")
    assert (runs / "ops-b" / "teacher" / "stage.json").exists(), jobs_api.job_status(url, sid_b)
    r = cli("stop", sid_b, "--address", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "STOPPED", r.stdout + r.stderr
    assert not (runs / "ops-b" / "distill" / "stage.json").exists(), "ops-b finished before it was stopped"

    r = cli("status", "ops-b", "--storage", str(runs), "--json")  # the run's progress, from storage alone
    assert r.returncode == 0, r.stderr
    prog = json.loads(r.stdout)
    assert prog["stage"] == "distill" and [s["state"] for s in prog["stages"]] == ["finished", "current"]

    r = cli("list", "--address", url, "--json")
    assert r.returncode == 0, r.stderr
    listed = {j["submission_id"]: j for j in json.loads(r.stdout)}
    outputs.append(r.stdout)
    assert listed[sid_a]["status"] == "SUCCEEDED" and listed[sid_b]["status"] == "STOPPED"
    assert listed[sid_a]["run"] == "ops-a" and listed[sid_a]["job_file"] == str(job_a)
    assert listed[sid_a]["env_names"] == ["AWS_SECRET_ACCESS_KEY", "KDC_EXTRA"]
    r = cli("list", "--address", url)
    assert r.returncode == 0 and "ops-b" in r.stdout and "STOPPED" in r.stdout
    outputs.append(r.stdout)

    job_b.unlink()  # resume needs nothing but the run's storage
    r = cli("resume", "ops-b", "--storage", str(runs), "--address", url, "--json")
    assert r.returncode == 0, r.stderr
    sid_c = json.loads(r.stdout)["submission_id"]
    assert sid_c != sid_b and "ops-b" in sid_c
    r = follow(sid_c, url)
    assert r.returncode == 0, r.stderr
    assert "(skipped)" in r.stdout and "stage distill" in r.stdout and "stage teacher" not in r.stdout, r.stdout[-3000:]
    assert jobs_api.job_status(url, sid_c)["status"] == "SUCCEEDED"
    assert json.loads((runs / "ops-b" / "distill" / "stage.json").read_text())["steps"] == 8

    # Ray's own CLI sees the same jobs
    ray_list = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", url], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "RAY_ADDRESS": ""})
    assert ray_list.returncode == 0, ray_list.stderr
    assert all(s in ray_list.stdout for s in (sid_a, sid_b, sid_c))

    # a request the cluster refuses: one line, exit 1
    r = cli("status", "kdc-no-such-job", "--address", url)
    assert r.returncode == 1 and "no such job" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    # credentials were forwarded by name only: their values appear in nothing we printed or wrote
    assert all(SECRET not in o for o in outputs)
    for f in runs.rglob("*"):
        if f.is_file() and f.stat().st_size < 5_000_000:
            assert SECRET.encode() not in f.read_bytes(), f


# -- without a cluster: errors, submissions as sent, runs in storage -------------------------------------------


def test_cluster_errors_are_one_line_and_nonzero(tiny_job: Any, capsys: Any, monkeypatch: Any,
                                                 own_output: Any) -> None:
    from kd_cluster.cli import main

    # Ray's forwarded lines (here the raylet's disk warning) are not the command's output; the rest is kept
    assert own_output("\x1b[33m(raylet)\x1b[0m [E] over 95% full\nerror: a.yaml: invalid job spec\n"
                      "  - x: (pid=3) unknown\n") == "error: a.yaml: invalid job spec\n  - x: (pid=3) unknown\n"
    job = tiny_job("err")
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    r = cli("submit", str(job), "--address", closed)  # a real process: exit status and the whole stderr
    assert r.returncode == 1 and "cannot reach the Ray Jobs API" in r.stderr and closed in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(*args: str) -> tuple[int, str]:
        rc = main(list(args))
        return rc, own_output(capsys.readouterr().err)

    # an invalid spec is reported exactly as `validate` reports it, before any connection is tried
    bad, val = run("submit", str(job), "optimizer.lrr=0.1", "--address", closed), run("validate", str(job),
                                                                                     "optimizer.lrr=0.1")
    assert bad[0] == val[0] == 2 and bad[1] == val[1] and "lrr" in bad[1]
    for args, needle in ((("list",), "no cluster address"), (("status", "kdc-x", "--address", "127.0.0.1:6379"),
                                                             "dashboard's URL"),
                         (("stop", "kdc-x", "--address", closed), closed), (("logs", "kdc-x", "--address", closed), closed),
                         (("resume", "nope", "--address", closed), "run 'nope'")):
        rc, text = run(*args)
        assert rc == (2 if args[0] == "resume" else 1) and needle in text and len(text.strip().splitlines()) == 1, text
    monkeypatch.setenv("RAY_ADDRESS", closed)
    rc, text = run("list")
    assert rc == 1 and closed in text


class FakeClient:
    """Records what a submission sends; reads the shipped spec while it still exists, as Ray's upload does."""

    def __init__(self, jobs: list[Any] | None = None) -> None:
        self.jobs = jobs or []
        self.sent: dict[str, Any] = {}

    def list_jobs(self) -> list[Any]:
        return self.jobs

    def submit_job(self, **kw: Any) -> str:
        wd = Path(kw["runtime_env"]["working_dir"])
        self.sent = {**kw, "files": {str(p.relative_to(wd)): p.read_text() for p in wd.rglob("*") if p.is_file()}}
        return kw["submission_id"]


def test_submission_ships_resolved_spec_and_code_and_env_by_name(tiny_job: Any, tmp_path: Path, monkeypatch: Any) -> None:
    job = tiny_job("ship", storage={"path": "rel-runs"})
    spec = load_job(job, ["schedule.steps=5"])
    fake = FakeClient()
    monkeypatch.setattr(jobs_api, "client", lambda address: fake)
    monkeypatch.chdir(tmp_path)
    for name in jobs_api.FORWARDED_ENV:  # the session's S3 fixture sets some of them
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("KDC_EXTRA", SECRET)
    sub = jobs_api.submit(spec, "ship.yaml", "http://127.0.0.1:8265", extra_env=["KDC_EXTRA"])
    sent = fake.sent
    assert sent["runtime_env"]["env_vars"] == {"AWS_SECRET_ACCESS_KEY": SECRET, "KDC_EXTRA": SECRET}
    assert sub.env_names == ["AWS_SECRET_ACCESS_KEY", "KDC_EXTRA"] and SECRET not in json.dumps(sub.__dict__)
    assert SECRET not in json.dumps(sent["metadata"]) and SECRET not in json.dumps(sent["files"])
    assert sent["entrypoint"] == "python -m kd_cluster.cli run ship.yaml" and list(sent["files"]) == ["ship.yaml"]
    assert sent["submission_id"].startswith("kdc-ship-") and sent["metadata"]["kd_cluster_run"] == "ship"
    assert Path(sent["runtime_env"]["py_modules"][0], "cli.py").is_file()
    assert not Path(sent["runtime_env"]["working_dir"]).exists(), "the staging folder is removed after the upload"
    # the shipped file is the resolved job: loading it gives the validated spec (overrides applied; the storage
    # folder made absolute because the cluster runs on this machine)
    (tmp_path / "shipped.yaml").write_text(sent["files"]["ship.yaml"])
    shipped = load_job(tmp_path / "shipped.yaml")
    assert shipped.schedule.steps == 5 and shipped.storage.path == str(tmp_path / "rel-runs")
    assert shipped.model_dump(exclude={"storage", "telemetry"}) == spec.model_dump(exclude={"storage", "telemetry"})
    assert sub.storage == str(tmp_path / "rel-runs" / "ship")

    # a remote cluster: local folders mean nothing there; kept as written, with a warning
    sub = jobs_api.submit(spec, "ship.yaml", "http://10.0.0.5:8265", forward_defaults=False)
    assert "env_vars" not in fake.sent["runtime_env"] and any("shared storage" in n for n in sub.notes)
    assert "storage:\n  path: rel-runs" in fake.sent["files"]["ship.yaml"]

    # a run that already has an unfinished driver is refused
    class Job:
        submission_id, status = "kdc-ship-1", "RUNNING"
        metadata = {"kd_cluster_run": "ship", "kd_cluster_storage": str(tmp_path / "rel-runs" / "ship")}

    fake.jobs = [Job()]
    with pytest.raises(jobs_api.ClusterError, match="already being driven by job kdc-ship-1"):
        jobs_api.submit(spec, "ship.yaml", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match="variable NAME"):
        jobs_api.forwarded_env(["AWS_SECRET_ACCESS_KEY=x"])


def test_wandb_target_names_entity_project_and_run(tiny_job: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    spec = load_job(tiny_job("wb"), ["telemetry.wandb_mode=online", "telemetry.wandb_entity=lab",
                                     "telemetry.wandb_project=kd"])
    assert jobs_api.wandb_target(spec, True) == "https://wandb.ai/lab/kd/runs/wb"
    auto = spec.model_copy(update={"telemetry": spec.telemetry.model_copy(update={"wandb_mode": "auto"})})
    assert "if the cluster has WANDB_API_KEY" in jobs_api.wandb_target(auto, False)


def test_local_status_shows_the_stage_and_latest_checkpoint(tiny_job: Any, tmp_path: Path, capsys: Any,
                                                            monkeypatch: Any, own_output: Any) -> None:
    from kd_cluster.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = load_job(tiny_job("st"))
    save_resolved_spec(spec, "st.yaml")
    run = tmp_path / "runs" / "st"
    Store(str(run / "teacher")).write_json("stage.json", {"steps": 6, "wall_s": 1.5,
                                                          "final_metrics": {"eval/student_top1": 0.25}})
    ck = CheckpointStore(Store(str(run / "distill")))
    ck.write_file(4, "state.pt", b"x")
    ck.commit(4, keep=2)
    assert main(["status", "st", "--storage", str(tmp_path / "runs"), "--json"]) == 0
    p = json.loads(own_output(capsys.readouterr().out))
    assert p["stage"] == "distill" and not p["finished"]
    teacher, distill = p["stages"]
    assert (teacher["state"], teacher["steps"], teacher["top1"]) == ("finished", 6, 0.25)
    assert (distill["state"], distill["checkpoint_step"], distill["total_steps"]) == ("current", 4, 8)
    assert main(["status", str(run)]) == 0  # the run's own folder; no address: the local form
    out = capsys.readouterr().out
    assert "in stage distill" in out and "4 / 8" in out and "0.2500" in out, out
    assert main(["status", "nope", "--storage", str(tmp_path / "runs")]) == 2
    text = capsys.readouterr().err
    assert "run 'nope'" in text and "runs under" in text and "st" in text


@pytest.mark.slow
def test_resume_runs_locally_from_the_stored_spec_alone(tiny_job: Any, tmp_path: Path, monkeypatch: Any) -> None:
    job = tiny_job("rs", storage={"path": "./runs"}, resources={"num_workers": 1},
                   schedule={"steps": 4, "eval_every": 4, "checkpoint_every": 2},
                   stages=[{"name": "teacher", "trains": "teacher",
                            "set": {"method": {"name": "supervised"}, "schedule": {"steps": 2}}}, {"name": "distill"}])
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    save_resolved_spec(load_job(job), "rs.yaml")
    monkeypatch.chdir(tmp_path)
    job.unlink()  # only the run's folder is left; its spec names the relative ./runs of another directory
    run = tmp_path / "a" / "runs" / "rs"
    r = cli("resume", str(run), "--no-ray")
    assert r.returncode == 0, r.stderr
    assert "resuming run rs (stage teacher)" in r.stdout
    assert json.loads((run / "teacher" / "stage.json").read_text())["steps"] == 2
    assert json.loads((run / "distill" / "stage.json").read_text())["steps"] == 4
    r = cli("resume", "rs", "--storage", str(tmp_path / "a" / "runs"), "--no-ray")
    assert r.returncode == 0 and "all stages finished" in r.stdout and "(skipped)" in r.stdout
