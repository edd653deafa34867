"""After a run: `eval`, `export`, `report` and `runs` on one tiny finished run (teacher stage + funmatch stage,
one process, no Ray), made once for the module."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import TINY
from kd_cluster.cli import main

RUN = "after"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished two-stage run under <tmp>/runs, its metric files under <tmp>/tel/metrics."""
    from kd_cluster.cluster import run_job
    from kd_cluster.config import load_job

    tmp = tmp_path_factory.mktemp("after")
    d = copy.deepcopy(TINY)
    d.update(name=RUN, storage={"path": str(tmp / "runs")}, resources={"num_workers": 1})
    d["telemetry"] = {**d["telemetry"], "wandb_dir": str(tmp / "tel" / "wandb"), "progress": False}
    d["schedule"] = {**d["schedule"], "steps": 4, "eval_every": 4, "checkpoint_every": 2}
    d["stages"][0]["set"]["schedule"] = {"steps": 4}
    job = tmp / f"{RUN}.yaml"
    job.write_text(yaml.safe_dump(d))
    run_job(load_job(job), str(job), use_ray=False)
    root = tmp / "runs" / RUN
    return {"tmp": tmp, "storage": str(tmp / "runs"), "root": root,
            "final": json.loads((root / "distill" / "stage.json").read_text())["final_metrics"],
            "teacher_final": json.loads((root / "teacher" / "stage.json").read_text())["final_metrics"]}


def _json_out(capsys: Any, own_output: Any) -> dict[str, Any]:
    return json.loads(own_output(capsys.readouterr().out))


def test_eval_of_a_run_equals_its_final_eval(finished: dict[str, Any], tmp_path: Path, capsys: Any,
                                              own_output: Any) -> None:
    from PIL import Image

    out = tmp_path / "e" / "eval.json"
    assert main(["eval", RUN, "--storage", finished["storage"], "--teacher", "job", "--out", str(out), "--json"]) == 0
    res = _json_out(capsys, own_output)
    fm = finished["final"]
    assert res["samples"] == 1000 and res["model"]["stage"] == "distill" and res["model"]["arch"] == "cnn_xs"
    assert res["top1"] == fm["eval/student_top1"] and res["top5"] == fm["eval/student_top5"]
    assert res["teacher_top1"] == fm["eval/teacher_top1"] and res["agreement"] == fm["eval/agreement"]
    assert all(abs(v["diff"]) == 0 for v in res["run_final_eval"].values()) and len(res["run_final_eval"]) == 4
    cm = np.array(res["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 1000 and np.trace(cm) / 1000 == res["top1"]
    assert [c["n"] for c in res["per_class"]] == cm.sum(axis=1).tolist()
    assert sum(c["top1"] * c["n"] for c in res["per_class"]) == pytest.approx(res["top1"] * 1000)
    assert 0.0 <= res["ece"] <= 1.0 and res["images_per_s"] > 0
    assert json.loads(out.read_text())["top1"] == res["top1"]
    with Image.open(res["confusion_png"]) as im:
        assert im.size[0] > 200 and im.size[1] > 200 and im.convert("L").getextrema() == (0, 255)

    # the teacher stage, evaluated by --stage, equals its own final eval
    assert main(["eval", RUN, "--storage", finished["storage"], "--stage", "teacher", "--out",
                 str(tmp_path / "t.json"), "--json"]) == 0
    assert _json_out(capsys, own_output)["top1"] == finished["teacher_final"]["eval/student_top1"]


def test_eval_shares_add_up_and_ece_matches_its_definition(finished: dict[str, Any]) -> None:
    """Two shares (as two Ray workers would compute them) give the counts of one pass; the ECE equals a direct
    computation from the model's softmax over the split."""
    import torch

    from kd_cluster.data import AugmentParams, EvalStream, load_manifest
    from kd_cluster.models import Normalizer, build_model, default_normalization, load_weights
    from kd_cluster.results.evaluate import evaluate_share, summarize, task_for
    from kd_cluster.results.target import from_run

    ref = from_run(RUN, finished["storage"])
    task = task_for(ref, "builtin://mnist5k/val", batch_size=100, loader_workers=0, device="cpu")
    one = evaluate_share(task)
    two = evaluate_share(task, 0, 2) + evaluate_share(task, 1, 2)
    assert (one.confusion == two.confusion).all() and one.top5 == two.top5
    assert (one.ece_count == two.ece_count).all() and np.allclose(one.ece_confidence, two.ece_confidence)
    classes = load_manifest("builtin://mnist5k/val").classes
    ece = summarize(one, classes)["ece"]

    m = build_model("cnn_xs", num_classes=10, in_chans=1)
    load_weights(m, ref.weights)
    m.eval()
    norm = Normalizer(*default_normalization(1), channels_last=False)
    stream = EvalStream(load_manifest("builtin://mnist5k/val"), batch_size=500, rank=0, world_size=1,
                        augment=AugmentParams(image_size=28, eval_resize_ratio=1.0, channels=1))
    conf, hit = [], []
    with torch.no_grad():
        for b in stream:
            p = m(norm(b["image"])).softmax(1)
            conf.append(p.max(1).values.double().numpy())
            hit.append((p.argmax(1) == b["label"]).numpy())
    conf_a, hit_a = np.concatenate(conf), np.concatenate(hit)
    edges = np.linspace(0, 1, 16)
    direct = sum(abs(hit_a[s].mean() - conf_a[s].mean()) * s.sum() / len(conf_a)
                 for s in ((conf_a > lo) & (conf_a <= hi) for lo, hi in zip(edges[:-1], edges[1:])) if s.any())
    assert ece == pytest.approx(direct, abs=1e-9)


def test_eval_of_weights_with_arch_and_user_errors(finished: dict[str, Any], tmp_path: Path, capsys: Any,
                                                   own_output: Any) -> None:
    weights = str(finished["root"] / "distill" / "model.safetensors")
    assert main(["eval", weights, "--arch", "cnn_xs", "--image-size", "28", "--data", "builtin://mnist5k/val",
                 "--out", str(tmp_path / "w.json"), "--json"]) == 0
    res = _json_out(capsys, own_output)
    assert res["top1"] == finished["final"]["eval/student_top1"] and res["run_final_eval"] is None
    assert main(["eval", weights, "--arch", "cnn_xs", "--data", "builtin://mnist5k/val"]) == 2
    assert "--image-size is required" in capsys.readouterr().err
    assert main(["eval", RUN, "--storage", finished["storage"], "--stage", "nope"]) == 2
    assert "the run has stages teacher, distill" in capsys.readouterr().err
    assert main(["eval", RUN, "--storage", finished["storage"], "--stage", "teacher", "--teacher", "job"]) == 2
    assert "was not trained against a teacher whose weights can be loaded" in capsys.readouterr().err


def test_export_onnx_is_checked_and_carries_its_metadata(finished: dict[str, Any], tmp_path: Path, capsys: Any,
                                                         own_output: Any) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    from kd_cluster.data import AugmentParams, EvalStream, load_manifest
    from kd_cluster.models import Normalizer, build_model, default_normalization, load_weights

    out = tmp_path / "x" / "student.onnx"
    assert main(["export", RUN, "--storage", finished["storage"], "--format", "onnx", "--out", str(out),
                 "--json"]) == 0
    side = _json_out(capsys, own_output)
    assert side["check"]["max_abs_diff"] <= 1e-3 and side["check"]["runtime"].startswith("onnxruntime")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    meta = json.loads(props["kd_cluster"])
    assert json.loads(props["classes"]) == [str(i) for i in range(10)] == meta["classes"]
    assert props["input_size"] == "1x28x28" and json.loads(props["mean"]) == [0.5] and json.loads(props["std"]) == [0.5]
    assert meta["source"]["run"] == RUN and meta["source"]["stage"] == "distill"
    assert [t["arch"] for t in meta["source"]["teacher"]] == ["cnn_s"]
    assert meta["source"]["teacher"][0]["weights"].endswith("teacher/model.safetensors")
    assert json.loads((tmp_path / "x" / "student.onnx.json").read_text())["classes"] == meta["classes"]

    # uint8 in, logits out, any batch size, equal to the run's torch model with its normalisation
    batch = next(iter(EvalStream(load_manifest("builtin://mnist5k/val"), batch_size=7, rank=0, world_size=1,
                                 augment=AugmentParams(image_size=28, eval_resize_ratio=1.0, channels=1))))["image"]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": batch.numpy()})[0]
    m = build_model("cnn_xs", num_classes=10, in_chans=1)
    load_weights(m, str(finished["root"] / "distill" / "model.safetensors"))
    with torch.no_grad():
        want = m.eval()(Normalizer(*default_normalization(1), channels_last=False)(batch)).numpy()
    assert got.shape == (7, 10) and np.abs(got - want).max() < 1e-4

    # above the tolerance the command fails and writes nothing
    bad = tmp_path / "y" / "student.onnx"
    assert main(["export", RUN, "--storage", finished["storage"], "--format", "onnx", "--out", str(bad),
                 "--tolerance", "-1"]) == 1
    assert "above --tolerance" in capsys.readouterr().err and not bad.exists()


def test_export_torchscript_and_safetensors_carry_metadata(finished: dict[str, Any], tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    ts = tmp_path / "student.pt"
    assert main(["export", RUN, "--storage", finished["storage"], "--format", "torchscript", "--out", str(ts)]) == 0
    files = {"kd_cluster.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        loaded = torch.jit.load(str(ts), _extra_files=files)
    assert json.loads(files["kd_cluster.json"])["input"]["dtype"] == "uint8"
    assert loaded(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 10)
    st = tmp_path / "student.safetensors"
    assert main(["export", RUN, "--storage", finished["storage"], "--format", "safetensors", "--out", str(st)]) == 0
    with safe_open(str(st), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["kd_cluster"])["normalization"]["applied"].startswith("by the user")
    assert meta["run"] == RUN and json.loads(meta["teacher"])[0]["arch"] == "cnn_s"


def _browser() -> str | None:
    for name in (os.environ.get("KD_CLUSTER_BROWSER"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHECK = """<script>window.addEventListener('load', () => { document.body.setAttribute('data-kdc-images',
JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt]))); });</script>"""


def _chromium(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_of_two_runs_renders_its_plots_in_a_browser(finished: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    # a second run to overlay: the same files under another name (what matters here is that both are drawn)
    tmp, other = finished["tmp"], "after-copy"
    if not (tmp / "runs" / other).exists():
        shutil.copytree(finished["root"], tmp / "runs" / other)
        job = json.loads((tmp / "runs" / other / "job.json").read_text())
        job["spec"]["name"] = other
        (tmp / "runs" / other / "job.json").write_text(json.dumps(job))
        shutil.copytree(tmp / "tel" / "metrics" / RUN, tmp / "tel" / "metrics" / other)
    out = tmp_path / "report.html"
    assert main(["report", RUN, other, "--storage", finished["storage"], "--out", str(out)]) == 0
    page = out.read_text()
    assert "http://" not in page and "https://" not in page and "src=\"file" not in page  # self-contained
    n_img = page.count("<img ")
    for title in ("loss term: kl", "loss term: ce", "learning rate", "student top-1 (val)", "teacher top-1 (val)",
                  "student-teacher agreement", "images/s", "data wait per step", "checkpoint stall"):
        assert f"<img alt=\"{title}\"" in page, title
    assert "no stage of these runs used teacher actors" in page  # that panel says why it has no plot
    assert page.count("<td>after</td>") == 2 and page.count("<td>after-copy</td>") == 2

    browser = _browser()
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no browser: CI installs Debian's chromium (.ci/run); set KD_CLUSTER_BROWSER to another one")
        pytest.skip("no chromium here (CI installs it)")
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK + "</body>"))
    r = _chromium(browser, tmp_path, "--dump-dom", "--virtual-time-budget=10000", checked.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    marker = r.stdout.split('data-kdc-images="', 1)[1].split('"', 1)[0]
    images = json.loads(marker.replace("&quot;", '"'))
    assert len(images) == n_img >= 12
    assert all(done and w == 640 and h == 360 for done, w, h, _ in images), images

    # and drawn: a screenshot of the first plot row is not blank (coloured curves on white)
    shot = tmp_path / "shot.png"
    r = _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1400,1200", "--hide-scrollbars",
                  out.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    plots = rgb[400:1150]  # below the title and the summary table
    coloured = (plots.max(axis=2) - plots.min(axis=2)) > 60  # saturated pixels: curves, not text or grid
    assert coloured.mean() > 0.002, coloured.mean()


def test_runs_lists_finished_in_progress_and_failed(finished: dict[str, Any], tmp_path: Path, capsys: Any,
                                                    own_output: Any, monkeypatch: Any) -> None:
    import kd_cluster.cli

    from kd_cluster.results import attempt
    from kd_cluster.results.store import FAILURE
    from kd_cluster.storage import CheckpointStore, Store

    storage = tmp_path / "runs"
    shutil.copytree(finished["root"], storage / RUN)
    for name in ("going", "broken"):  # the distill stage not finished: its marker gone, a checkpoint at step 2
        shutil.copytree(finished["root"], storage / name)
        job = json.loads((storage / name / "job.json").read_text())
        job["spec"]["name"] = name
        job["spec"]["storage"]["path"] = str(storage)
        (storage / name / "job.json").write_text(json.dumps(job))
        (storage / name / "distill" / "stage.json").unlink()
        ck = CheckpointStore(Store(str(storage / name / "distill")))
        assert ck.latest() == 4
        ck.commit(2, keep=3)
    from kd_cluster.config import JobSpec

    spec = JobSpec.model_validate(json.loads((storage / "broken" / "job.json").read_text())["spec"])
    with pytest.raises(RuntimeError, match="disk on fire"), attempt(spec):
        raise RuntimeError("worker lost\ndisk on fire")
    failure = json.loads((storage / "broken" / FAILURE).read_text())
    assert failure["stage"] == "distill" and failure["error"] == "RuntimeError: disk on fire"
    (storage / "notarun").mkdir()

    assert main(["runs", "--storage", str(storage), "--json"]) == 0
    rows = {r["run"]: r for r in _json_out(capsys, own_output)}
    assert set(rows) == {RUN, "going", "broken"}
    assert rows[RUN]["state"] == "finished" and rows[RUN]["stages"][1]["top1"] == finished["final"]["eval/student_top1"]
    assert rows["going"]["state"] == "in progress" and rows["going"]["stages"][1]["checkpoint_step"] == 2
    assert rows["broken"]["state"] == "failed" and rows["broken"]["failure"]["stage"] == "distill"
    monkeypatch.setattr(kd_cluster.cli.console, "width", 200)  # the table unwrapped
    assert main(["runs", "--storage", str(storage)]) == 0
    text = own_output(capsys.readouterr().out)
    assert "checkpoint 2 / 4" in text and "in progress" in text
    assert "broken: failed in stage distill: RuntimeError: disk on fire" in text

    with attempt(spec):  # a new attempt forgets the failure
        assert not (storage / "broken" / FAILURE).exists()
