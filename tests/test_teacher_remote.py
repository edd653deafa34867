"""Teacher served apart from the worker (teacher.placement: actors), without Ray: the server applies the same
normalisation, mixup and expansion as the colocated path, the client pipelines, bounds and retries requests."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kd_cluster.data import mixup
from kd_cluster.methods import Method, MethodConfig, Needs, StepOutputs
from kd_cluster.models import build_model
from kd_cluster.teacher import ColocatedTeacher
from kd_cluster.teacher.remote import LocalPool, RemoteTeacher, TeacherRequest, TeacherServer, TeacherUnavailable
from kd_cluster.train.loop import Normalizer, train_step

CPU = torch.device("cpu")
MEAN, STD = [0.5], [0.25]


def _rot2(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.rot90(1, (2, 3))])


def _make_method(view: str, taps: tuple[str, ...], expand: bool) -> Method:
    class TapConfig(MethodConfig):
        def needs(self) -> Needs:
            return Needs(teacher=True, teacher_view=view, labels=True, teacher_features=taps)

    class Toy(Method):
        Config = TapConfig

        def expand(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
            return _rot2(x) if expand else x

        def forward(self, out: StepOutputs) -> dict[str, torch.Tensor]:
            terms = {"kl": F.kl_div(F.log_softmax(out.student_logits, 1), F.log_softmax(out.teacher_logits, 1),
                                    reduction="batchmean", log_target=True)}
            for k, v in out.teacher_features.items():
                terms[f"f_{k}"] = v.pow(2).mean()
            return terms

    return Toy(TapConfig())


def _batch(n: int = 6, with_t: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    b = {"image": torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8),
         "label": torch.arange(n) % 10, "index": torch.arange(n), "step": 3}
    if with_t:
        b["image_t"] = torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    return b


@pytest.mark.parametrize("view,taps,expand", [("same", (), False), ("center", (), False),
                                              ("independent", ("stage2.0.relu",), False),
                                              ("same", ("pool1",), True)])
def test_actors_path_equals_colocated_exactly_fp32(view: str, taps: tuple[str, ...], expand: bool) -> None:
    torch.manual_seed(0)
    t_model = build_model("cnn_s", num_classes=10, in_chans=1)
    student = build_model("cnn_xs", num_classes=10, in_chans=1)
    norm = Normalizer(MEAN, STD, False)
    method = _make_method(view, taps, expand)
    lam = 0.7
    local = ColocatedTeacher(t_model, CPU, taps=taps)
    server = TeacherServer(ColocatedTeacher(t_model, CPU, taps=taps), Normalizer(MEAN, STD, False),
                           method.expand if expand else None)
    remote = RemoteTeacher(LocalPool([server]), CPU, prefetch=1, teacher_view=view)
    kw = dict(net=student, method=method, norm=norm, device=CPU, autocast=contextlib.nullcontext(), step=3)
    want = train_step(_batch(with_t=view != "same"), lam, teacher=local, **kw)
    fed = next(remote.feed(iter([_batch(with_t=view != "same")]), lambda s: lam))
    assert "image_t" not in fed  # the other view went to the teacher, not to the student's device
    got = train_step(fed, lam, teacher=remote, **kw)
    assert list(got) == list(want) and len(want) == 1 + len(taps)
    for k in want:  # fp32 on the CPU: bit-identical
        assert torch.equal(got[k], want[k]), k
    # the teacher's logits themselves, against the formula written out (norm, then roll-by-one mixup)
    b = _batch(with_t=view != "same")
    src = b["image_t"] if view != "same" else b["image"]
    x = (src.float() - MEAN[0] * 255) * (1 / (STD[0] * 255))
    if view != "center":
        x = lam * x + (1 - lam) * torch.cat([x[-1:], x[:-1]])
    if expand:
        x = _rot2(x)
    with torch.no_grad():
        ref = t_model.eval()(x)
    req = TeacherRequest(src, lam if view != "center" else 1.0, True)
    assert torch.allclose(server.infer(req).logits, ref, atol=1e-5)
    remote.close()


def test_request_is_uint8_and_reply_is_what_the_method_asked_for() -> None:
    t_model = build_model("cnn_s", num_classes=10, in_chans=1)
    server = TeacherServer(ColocatedTeacher(t_model, CPU, taps=("pool1",)), Normalizer(MEAN, STD, False), None)
    req = TeacherRequest(torch.zeros(4, 1, 12, 12, dtype=torch.uint8), 0.6)
    rep = server.infer(req)
    assert req.nbytes() == 4 * 144 + 64  # one byte per pixel, plus the scalars
    assert set(rep.features) == {"pool1"} and rep.logits.shape == (4, 10) and rep.logits.dtype == torch.float32
    assert rep.nbytes() == 4 * (10 + rep.features["pool1"][0].numel()) * 4 + 64


class FakePool:
    """Replies computed from the request (sum of pixels) after ``delay``; records submissions; can fail."""

    def __init__(self, size: int, delay: float = 0.0, fail: dict[int, int] | None = None,
                 fail_steps: set[int] | None = None) -> None:
        self.size, self.delay = size, delay
        self.fail = dict(fail or {})  # replica -> how many of its next requests fail
        self.fail_steps = set(fail_steps or ())  # the first request of these steps fails, whatever the replica
        self.log: list[tuple[int, int, float]] = []  # (replica, step, time)
        self.ids = [f"r{i}" for i in range(size)]
        self.lock = threading.Lock()

    def submit(self, replica: int, req: TeacherRequest) -> Future:
        from kd_cluster.teacher.remote import TeacherReply

        fut: Future = Future()
        with self.lock:
            self.log.append((replica, req.step, time.perf_counter()))
            failing = self.fail.get(replica, 0) > 0 or req.step in self.fail_steps
            self.fail_steps.discard(req.step)
            if failing:
                self.fail[replica] = self.fail.get(replica, 0) - 1
                self.ids[replica] += "+"  # the replica comes back as a new server

        def run() -> None:
            time.sleep(self.delay)
            if failing:
                fut.set_exception(RuntimeError("actor died"))
            else:
                v = req.image.float().sum() * req.lam
                fut.set_result(TeacherReply(v.view(1, 1), {}, self.ids[replica], self.delay))

        threading.Thread(target=run, daemon=True).start()
        return fut

    def close(self) -> None:
        pass


def _stream(n: int):
    for s in range(n):
        yield {"image": torch.full((2, 1, 2, 2), s, dtype=torch.uint8), "step": s}


@pytest.mark.parametrize("prefetch,max_in_flight,depth", [(0, 4, 1), (2, 4, 3), (8, 3, 3)])
def test_pipelining_is_bounded_and_in_order(prefetch: int, max_in_flight: int, depth: int) -> None:
    pool = FakePool(2, delay=0.01)
    rt = RemoteTeacher(pool, CPU, prefetch=prefetch, max_in_flight=max_in_flight)
    got = []
    for b in rt.feed(_stream(12), lambda s: 1.0):
        # when step s is handed to the loop, requests up to s + depth - 1 are already submitted, no more
        assert max(step for _, step, _ in pool.log) == min(b["step"] + depth - 1, 11)
        logits, _ = rt.outputs(b["teacher_out"])
        got.append((b["step"], float(logits)))
    assert got == [(s, 8.0 * s) for s in range(12)]
    assert {r for r, _, _ in pool.log} == {0, 1}  # spread over the pool
    m = rt.metrics()
    assert m["teacher/queue_depth_max"] <= depth and m["teacher/up_bytes_per_image"] == (8 + 64) / 2
    assert 0.0 < m["teacher/latency_p50_s"] <= m["teacher/latency_p95_s"]


def test_prefetch_overlaps_teacher_with_the_step() -> None:
    def run(prefetch: int) -> float:
        rt = RemoteTeacher(FakePool(1, delay=0.05), CPU, prefetch=prefetch)
        t0 = time.perf_counter()
        for b in rt.feed(_stream(8), lambda s: 1.0):
            rt.outputs(b["teacher_out"])
            time.sleep(0.05)  # the student's step
        return time.perf_counter() - t0

    assert run(1) < 0.75 * run(0)  # ~0.45 s against ~0.8 s


def test_failed_request_is_retried_on_another_replica() -> None:
    pool = FakePool(2, fail_steps={4, 5})
    rt = RemoteTeacher(pool, CPU, prefetch=2, timeout_s=5, max_retries=3)
    out = [(b["step"], float(rt.outputs(b["teacher_out"])[0])) for b in rt.feed(_stream(12), lambda s: 0.5)]
    assert out == [(s, 4.0 * s) for s in range(12)]  # every step once, in order, correct
    tries = {s: [r for r, step, _ in pool.log if step == s] for s in range(12)}
    assert len(tries[4]) == len(tries[5]) == 2 and all(len(tries[s]) == 1 for s in tries if s not in (4, 5))
    assert tries[4][0] != tries[4][1] and tries[5][0] != tries[5][1]  # retried on the other replica
    m = rt.metrics()
    # each replica that failed answered later as a new server: one restart per failed replica
    assert m["teacher/retries"] == 2.0 and m["teacher/restarts"] == len({tries[4][0], tries[5][0]})


def test_request_failing_everywhere_is_a_clear_error() -> None:
    rt = RemoteTeacher(FakePool(1, fail={0: 10}), CPU, prefetch=0, timeout_s=5, max_retries=2)
    b = next(rt.feed(_stream(1), lambda s: 1.0))
    with pytest.raises(TeacherUnavailable, match="step 0 failed 3 times"):
        rt.outputs(b["teacher_out"])


def test_mixup_on_server_matches_data_mixup() -> None:
    t_model = build_model("cnn_xs", num_classes=10, in_chans=1)
    server = TeacherServer(ColocatedTeacher(t_model, CPU), Normalizer(MEAN, STD, False), None)
    img = _batch()["image"]
    norm = Normalizer(MEAN, STD, False)
    with torch.no_grad():
        assert torch.equal(server.infer(TeacherRequest(img, 0.8)).logits, t_model.eval()(mixup(norm(img), 0.8)))


def test_no_ray_job_with_actors_logs_the_same_losses_as_colocated(tiny_job, tmp_path) -> None:
    import json

    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    logs = {}
    for placement in ("colocated", "actors"):
        job = tiny_job(placement, resources={"num_workers": 1},
                       teacher={"arch": "cnn_s", "weights": "stage:teacher", "placement": placement, "prefetch": 2})
        run_job(load_job(job), str(job), use_ray=False)
        f = tmp_path / "tel" / "metrics" / placement / "distill.jsonl"
        logs[placement] = [json.loads(line) for line in f.read_text().splitlines()]
    col, act = logs["colocated"], logs["actors"]
    assert [m["step"] for m in act] == [m["step"] for m in col] == [2, 4, 6, 8]
    for a, c in zip(act, col):
        assert a["loss"] == c["loss"] and a["kl"] == c["kl"]  # fp32 on the CPU: exact
    assert act[-1]["eval/teacher_top1"] == col[-1]["eval/teacher_top1"]
    assert act[-1]["teacher/up_bytes_per_image"] == 28 * 28 + 64 / 32  # uint8 crops of 28 px, 32 per request
    assert act[-1]["teacher/down_bytes_per_image"] == 10 * 4 + 64 / 32  # 10 fp32 logits
    assert "teacher/latency_p95_s" in act[-1] and "teacher/queue_depth" in act[-1]


@pytest.mark.slow
def test_ray_teacher_actor_killed_mid_run_every_step_once(ray_cluster: str, tiny_job, tmp_path) -> None:
    import json

    import ray

    from kd_cluster.cluster import run_job
    from kd_cluster.cluster.teacher_pool import actor_name
    from kd_cluster.config import load_job

    job = tiny_job("kill", resources={"num_workers": 1},
                   teacher={"arch": "cnn_s", "weights": "stage:teacher", "placement": "actors", "replicas": 2,
                            "num_cpus": 0.5, "prefetch": 2, "max_restarts": 2, "request_timeout_s": 60},
                   schedule={"steps": 40, "warmup_steps": 2, "log_every": 2, "eval_every": 40,
                             "checkpoint_every": 40})
    metrics = tmp_path / "tel" / "metrics" / "kill" / "distill.jsonl"
    killed: list[str] = []
    run_over = threading.Event()

    def killer() -> None:
        # waits on the run's progress (its distill log reaching step 6), however long the teacher stage and
        # Ray's start-up take on a loaded machine; gives up only when the run is over
        while not run_over.is_set():
            if metrics.exists() and any(json.loads(x)["step"] >= 6 for x in metrics.read_text().splitlines()):
                handle = ray.get_actor(actor_name("kill", "distill", 0))
                killed.append(handle._actor_id.hex())
                ray.kill(handle, no_restart=False)  # Ray restarts it; its requests in flight are lost
                return
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        run_job(load_job(job), str(job), use_ray=True, address=ray_cluster)
    finally:
        run_over.set()
        th.join(30)
    assert killed, "the teacher actor was never killed"
    log = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in log] == list(range(2, 41, 2))  # every log step, once
    assert log[-1]["teacher/restarts"] == 1  # replica 0 answered again, as a new server
    assert all(m["loss"] == m["loss"] for m in log)  # no NaN


_FORK_WATCH: dict = {"pool": None, "forks_in_flight": []}


def _before_fork() -> None:
    pool = _FORK_WATCH["pool"]
    if pool is not None:
        _FORK_WATCH["forks_in_flight"].append(pool.in_flight)


def test_no_fork_while_teacher_requests_are_in_flight(tiny_job, tmp_path, monkeypatch) -> None:
    """A process fork while a Ray call is in flight crashed Ray workers (gRPC's fork handlers): the loop forks
    every loader process (train and eval) before the first pipelined request, and never again."""
    import os

    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job
    from kd_cluster.teacher import remote

    class WatchedPool(LocalPool):
        in_flight = 0
        submitted = 0

        def submit(self, replica, req):
            type(self).in_flight += 1
            type(self).submitted += 1
            # a slow teacher: the requests of the steps ahead are still running when evaluation starts
            delay = 0.3 if req.step >= 0 else 0.0
            fut = self._ex[replica].submit(lambda: (time.sleep(delay), self.servers[replica].infer(req))[1])
            fut.add_done_callback(lambda _f: setattr(type(self), "in_flight", type(self).in_flight - 1))
            return fut

    monkeypatch.setattr(remote, "LocalPool", WatchedPool)
    os.register_at_fork(before=_before_fork)
    _FORK_WATCH["pool"] = WatchedPool
    try:
        # evaluation at steps 4 and 8 with 2 steps prefetched: the old code forked its eval loader mid-stream
        job = tiny_job("forks", resources={"num_workers": 1},
                       teacher={"arch": "cnn_s", "weights": "stage:teacher", "placement": "actors", "prefetch": 2},
                       schedule={"steps": 8, "warmup_steps": 2, "log_every": 2, "eval_every": 4, "checkpoint_every": 8})
        _FORK_WATCH["forks_in_flight"].clear()
        run_job(load_job(job), str(job), use_ray=False)
    finally:
        _FORK_WATCH["pool"] = None
    forks = _FORK_WATCH["forks_in_flight"]
    assert WatchedPool.submitted > 8  # the stage ran on the pool
    assert len(forks) >= 4  # train + eval loader workers, teacher stage and distill stage
    assert forks == [0] * len(forks), f"forked with teacher requests in flight: {forks}"


@pytest.mark.slow
def test_ray_actor_outputs_equal_in_process_server_exactly(ray_cluster: str, tmp_path) -> None:
    """The same requests through a real Ray actor (uint8 crops and outputs serialised by Ray, pipelined over
    RayTeacherPool) give bitwise the outputs of an in-process server with the same weights (fp32 on the CPU)."""
    import ray

    from kd_cluster.cluster.teacher_pool import RayTeacherPool, TeacherActor
    from kd_cluster.models import save_weights
    from kd_cluster.teacher.remote import ServerConfig, build_server

    torch.manual_seed(3)
    weights = str(tmp_path / "teacher.safetensors")
    save_weights(build_model("cnn_s", num_classes=10, in_chans=1), weights)
    cfg = ServerConfig(arch="cnn_s", num_classes=10, channels=1, weights=weights, endpoint_url=None,
                       taps=("stage2", "pool"), mean=MEAN, std=STD, method_name="funmatch")
    actor = TeacherActor.options(num_cpus=0.5, max_restarts=0).remote(cfg, 1)
    try:
        ray_client = RemoteTeacher(RayTeacherPool([actor]), CPU, prefetch=2, max_in_flight=3)
        local = RemoteTeacher(LocalPool([build_server(cfg, CPU)]), CPU, prefetch=2, max_in_flight=3)
        g = torch.Generator().manual_seed(0)
        batches = [{"image": torch.randint(0, 256, (16, 1, 28, 28), generator=g, dtype=torch.uint8), "step": s}
                   for s in range(6)]
        lam = [1.0, 0.7, 0.35, 0.5, 0.9, 0.2]
        got = [ray_client.outputs(b["teacher_out"]) for b in ray_client.feed(iter(dict(x) for x in batches), lam.__getitem__)]
        want = [local.outputs(b["teacher_out"]) for b in local.feed(iter(dict(x) for x in batches), lam.__getitem__)]
        local.close()
        assert len(got) == len(want) == 6
        for (gl, gf), (wl, wf) in zip(got, want):
            assert gl.dtype == torch.float32 and torch.equal(gl, wl)
            assert set(gf) == {"stage2", "pool"} and all(torch.equal(gf[k], wf[k]) for k in wf)
        m = ray_client.metrics()
        assert m["teacher/up_bytes_per_image"] == 28 * 28 + 64 / 16  # uint8 crops, 16 per request
    finally:
        ray.kill(actor, no_restart=True)


def test_bench_summary_ratios_are_per_round() -> None:
    from kd_cluster.bench.teacher import format_table, summarize

    rounds = {"colocated: 2 DDP worker(s) x 1 CPU": [100.0, 200.0, 150.0],
              "actors, prefetch 1: 1 worker(s) + 1 teacher(s)": [95.0, 150.0, 150.0]}
    res = summarize(rounds, s_rate=80.0, t_rate=40.0)
    # per-round ratios 0.95, 0.75, 1.0 -> median 0.95 (the ratio of the medians would be 150/150 = 1.0)
    assert res["ratios"] == {"actors, prefetch 1: 1 worker(s) + 1 teacher(s)": pytest.approx(0.95)}
    assert res["replicas_per_student"] == 2 and res["separate_teacher_ceiling"] == 40.0
    assert res["colocated_ceiling"] == pytest.approx(1 / (1 / 80 + 1 / 40))
    assert "0.95x" in format_table(res)


def test_bench_teacher_without_ray_needs_neither_ray_nor_the_data(tiny_job: Any) -> None:
    """The Ray-free bench is what runs on a GPU machine without Ray, for a job whose data and teacher weights
    live in object storage it cannot reach: it must import no Ray and open no remote data."""
    import json
    import subprocess
    import sys

    closed = "http://127.0.0.1:9"  # nothing listens there: any attempt to open the data would fail
    job = tiny_job("bn", data={"train": "s3://no-such-bucket/train/manifest.json",
                               "val": "s3://no-such-bucket/val/manifest.json", "endpoint_url": closed})
    code = ("import sys; sys.modules['ray'] = None  # any import of ray now raises\n"
            "from kd_cluster.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "bench", "teacher", str(job), "--no-ray", "--steps", "2",
                        "--rounds", "2", "--batch", "4", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["student_rate"] > 0 and res["teacher_rate"] > 0
    (name, rates), = res["rounds"].items()  # the colocated rate of each round, measured in the same process
    assert name.startswith("colocated") and len(rates) == 2 and min(rates) > 0
    assert res["colocated_ceiling"] == pytest.approx(1 / (1 / res["student_rate"] + 1 / res["teacher_rate"]))
    assert "colocated (1 worker" in r.stdout


@pytest.mark.slow
def test_bench_teacher_on_ray_runs_every_configuration(ray_cluster: str) -> None:
    from kd_cluster.bench.teacher_ray import bench_teacher_ray
    from kd_cluster.bench.teacher import BenchSetup

    b = BenchSetup(student="cnn_xs", teacher="cnn_s", batch=8, image_size=28, channels=1, num_classes=10,
                   steps=3, warmup=1)
    res = bench_teacher_ray(b, cores=2, replicas=1, prefetches=(0, 1), rounds=1)
    assert set(res["rounds"]) == {"colocated: 2 DDP worker(s) x 1 CPU",
                                  "actors, prefetch 0: 1 worker(s) + 1 teacher(s)",
                                  "actors, prefetch 1: 1 worker(s) + 1 teacher(s)"}
    assert all(v[0] > 0 for v in res["rounds"].values())
    assert res["student_rates"][0] > 0 and res["teacher_rates"][0] > 0
    assert res["teacher_metrics"][1]["up_bytes_per_image"] == 28 * 28 + 64 / 8
    with pytest.raises(ValueError, match="no core for a student"):
        bench_teacher_ray(b, cores=1, replicas=1, prefetches=(1,), rounds=1)


def test_replies_are_freed_without_the_cyclic_garbage_collector() -> None:
    """A reply (teacher features: megabytes) must be freed when the step drops it, not when the cyclic GC
    runs: a reference cycle through the request's done-callback grew a worker by ~35 KB per step."""
    import gc
    import weakref

    from kd_cluster.teacher.remote import ServerConfig, build_server

    cfg = ServerConfig(arch="cnn_s", num_classes=10, channels=1, weights=None, endpoint_url=None,
                       taps=("stage2",), mean=MEAN, std=STD, method_name="funmatch")
    rt = RemoteTeacher(LocalPool([build_server(cfg, CPU)]), CPU, prefetch=2, max_in_flight=4)
    refs = []
    gc.collect()
    gc.disable()
    try:
        stream = ({"image": torch.full((4, 1, 28, 28), s, dtype=torch.uint8), "step": s} for s in range(12))
        for b in rt.feed(stream, lambda s: 0.5):
            logits, feats = rt.outputs(b["teacher_out"])
            refs.append((weakref.ref(logits), weakref.ref(feats["stage2"])))
            del logits, feats, b
        alive = [i for i, (r1, r2) in enumerate(refs) if r1() is not None or r2() is not None]
        p = rt.request(TeacherRequest(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)))
        p.result()
        with pytest.raises(RuntimeError, match="already taken"):
            p.result()
    finally:
        gc.enable()
        rt.close()
    assert len(refs) == 12 and alive == []
