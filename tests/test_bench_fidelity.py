"""`kd-cluster bench fidelity` end to end on a tiny IDX fixture (two methods, a few steps): the table, the CSV
of every run and the plot it writes, and a second call that reuses every finished run. No accuracy claims."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from kd_cluster.bench.fidelity import FULL, LONG_METHODS, METHODS, plan_cells, run_prefix, split_url
from test_fashion_mnist import write_idx_set


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_CLUSTER_FASHION_MNIST": str(tmp_path / "fm"), "KD_CLUSTER_CACHE": str(tmp_path / "cache"),
           "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "kd_cluster.cli", "bench", "fidelity", "--out", str(tmp_path / "out"),
                           *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_bench_fidelity_end_to_end(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "fm", n_train=300, n_test=40)
    args = ("--methods", "kd,funmatch", "--seeds", "0,1", "--budgets", "3,6", "--teacher-steps", "3")
    r = bench(tmp_path, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    teacher, *rows = list(csv.DictReader((out / "runs.csv").open()))
    assert teacher["method"] == "teacher" and teacher["budget"] == "3" and teacher["run"] == "fmnist-teacher-3"
    # budget 3: scratch, kd, funmatch; budget 6: scratch and funmatch only (kd is not of the long family); 2 seeds
    cells = sorted((r["method"], int(r["budget"]), int(r["seed"])) for r in rows)
    assert cells == sorted([(m, 3, s) for m in ("scratch", "kd", "funmatch") for s in (0, 1)]
                           + [(m, 6, s) for m in ("scratch", "funmatch") for s in (0, 1)])
    for row in rows:
        assert 0.0 <= float(row["top1"]) <= 1.0 and row["reused"] == "0"
        assert (out / "runs" / row["run"] / "job.json").is_file()  # an ordinary run folder
        assert row["command"].startswith(f"kd-cluster run {row['job']} --no-ray name={row['run']} seed={row['seed']}")
    assert (out / "runs" / "fmnist-teacher-3" / "teacher" / "model.safetensors").is_file()
    for row in rows:  # agreement with the teacher: every distilled run has both, the scratch student neither
        has = row["method"] != "scratch"
        assert bool(row["val_agreement"]) == has and bool(row["train_batch_agreement"]) == has, row
        assert has or row["loss_terms"].startswith("ce=")
        assert all(0.0 <= float(row[k]) <= 1.0 for k in ("val_agreement", "train_batch_agreement") if row[k])
    table = (out / "table.md").read_text()
    blocks = [b for b in table.split("\n\n") if b.startswith("|")]
    assert len(blocks) == 2  # the main table and the function-matching family's agreement table
    family = blocks[1].splitlines()
    assert family[0].startswith("| method | steps | top-1 | agreement, last train batch | agreement, eval split |")
    assert [ln.split(" | ")[:2] for ln in family[2:]] == [["| funmatch", "3"], ["| funmatch", "6"]]
    lines = blocks[0].splitlines()
    assert lines[0].startswith("| method | steps | seeds | top-1 mean ± std | vs scratch |")
    assert len(lines) == 2 + 5 + 1  # header, rule, 5 (method, budget) rows, the teacher
    assert any(ln.startswith("| kd | 3 | 2 | ") for ln in lines) and any(ln.startswith("| funmatch | 6 | 2 |") for ln in lines)
    with Image.open(out / "fidelity.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert "scratch (untuned, CE only)" in r.stdout and "wall time" in r.stdout

    # a second call trains nothing: the teacher and every cell are found finished and reused
    r = bench(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    again = list(csv.DictReader((out / "runs.csv").open()))[1:]
    assert [x["reused"] for x in again] == ["1"] * len(rows)
    assert [x["top1"] for x in again] == [x["top1"] for x in rows]

    # a changed recipe never reuses the old recipe's runs: one line naming the run and the field, nothing trained
    import shutil

    import yaml

    jobs = tmp_path / "jobs" / "fashion_mnist"
    shutil.copytree(Path(__file__).resolve().parent.parent / "jobs", tmp_path / "jobs")
    kd = yaml.safe_load((jobs / "kd.yaml").read_text())
    kd["method"]["temperature"] = 7.0
    (jobs / "kd.yaml").write_text(yaml.safe_dump(kd))
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    r = bench(tmp_path, *args, "--jobs-dir", str(jobs))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "fmnist-kd-b3-s0" in r.stderr and "method.temperature" in r.stderr and "another --out" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == before

    # the limited-data regime: students (here cnn_s, DML's peer too) on train500; the teacher is the one above
    r = bench(tmp_path, "--methods", "dml", "--seeds", "0", "--budgets", "3", "--teacher-steps", "3",
              "--train-split", "train500", "--student", "cnn_s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "reused here" in (out / "table.md").read_text()
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(x["method"], x["run"], x["reused"]) for x in rows] == [
        ("teacher", "fmnist-teacher-3", "1"), ("scratch", "fmnist-train500-cnn_s-scratch-b3-s0", "0"),
        ("dml", "fmnist-train500-cnn_s-dml-b3-s0", "0")]
    dml = json.loads((out / "runs" / rows[2]["run"] / "job.json").read_text())["spec"]
    assert dml["student"]["arch"] == "cnn_s" and dml["method"]["peers"] == ["cnn_s"]
    assert dml["data"]["train"] == "builtin://fashion-mnist/train500"
    r = bench(tmp_path, "--methods", "kd", "--seeds", "0", "--budgets", "3", "--student", "nope")
    assert r.returncode == 2 and "--student" in r.stderr and "nope" in r.stderr, r.stderr


def test_bench_fidelity_bad_options_are_one_line(tmp_path: Path) -> None:
    for args, needle in ((("--methods", "kd,nope"), "unknown ['nope']"), (("--seeds", "a"), "--seeds 'a'"),
                         (("--budgets", "0"), ">= 1")):
        r = bench(tmp_path, *args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_plan_cells_share_init_and_data_order_across_methods() -> None:
    jobs = Path(__file__).resolve().parent.parent / "jobs" / "fashion_mnist"
    cells = plan_cells(jobs, list(METHODS), FULL["seeds"], FULL["budgets"], "/r", "/t.safetensors", "tr", "te", "p")
    for c in cells:
        assert Path(c.job).is_file()
        assert f"seed={c.seed}" in c.overrides and f"schedule.steps={c.budget}" in c.overrides
        assert ("teacher.weights=/t.safetensors" in c.overrides) == (c.method not in ("scratch", "dml", "ie_dml"))
    long = {c.method for c in cells if c.budget == FULL["budgets"][1]}
    assert long == set(LONG_METHODS)
    assert len({c.run for c in cells}) == len(cells)


def test_tuned_baseline_is_at_every_budget() -> None:
    """The tuned scratch student is the baseline of every budget's rows, also where the other methods run at the
    first budget only (no --all-budgets), and with the steps its search chose."""
    from kd_cluster.bench.fidelity import Tuned

    jobs = Path(__file__).resolve().parent.parent / "jobs" / "fashion_mnist"
    tuned = Tuned(overrides=("optimizer.lr=0.012",), steps_factor=2.0)
    cells = plan_cells(jobs, ["funmatch", "kd"], [0], [5, 20], "/r", "/t.safetensors", "tr", "te", "p", tuned=tuned)
    assert sorted((c.method, c.budget, c.steps) for c in cells) == sorted([
        ("scratch", 5, 5), ("scratch_tuned", 5, 10), ("funmatch", 5, 5), ("kd", 5, 5),
        ("scratch", 20, 20), ("scratch_tuned", 20, 40), ("funmatch", 20, 20)])
    assert all("optimizer.lr=0.012" in c.overrides for c in cells if c.method == "scratch_tuned")


def test_runs_of_another_dataset_or_split_are_other_runs() -> None:
    names = {run_prefix("fashion-mnist", "test"), run_prefix("fashion-mnist", "val"), run_prefix("/data/kmnist", "test"),
             run_prefix("s3://b/kmnist/", "val"), run_prefix("fashion-mnist", "test", "train500"),
             run_prefix("fashion-mnist", "test", "train500", "cnn_s"), run_prefix("fashion-mnist", "test", "train", "cnn_s"),
             run_prefix("fashion-mnist", "test", "train", "timm:resnet18")}
    assert len(names) == 8 and run_prefix("fashion-mnist", "test") == "fmnist"
    assert run_prefix("fashion-mnist", "test", "train", None) == "fmnist"  # the defaults name the full regime's runs
    assert all(n[0].isalnum() for n in names) and not any(":" in n or "/" in n for n in names)
    assert split_url("fashion-mnist", "train500") == "builtin://fashion-mnist/train500"
    assert split_url("s3://b/kmnist/", "test") == "s3://b/kmnist/test"


def test_a_chosen_student_is_every_run_s_student_and_dml_s_peers() -> None:
    jobs = Path(__file__).resolve().parent.parent / "jobs" / "fashion_mnist"
    cells = plan_cells(jobs, list(METHODS), [0], [5], "/r", "/t.safetensors", "tr", "te", "p", student="cnn_s")
    for c in cells:
        assert "student.arch=cnn_s" in c.overrides
        assert ("method.peers=[cnn_s]" in c.overrides) == (c.method == "dml")
        assert ("method.peer_arch=cnn_s" in c.overrides) == (c.method == "ie_dml")
    plain = plan_cells(jobs, list(METHODS), [0], [5], "/r", "/t.safetensors", "tr", "te", "p")
    assert not any(o.startswith(("student.", "method.peer")) for c in plain for o in c.overrides)


def test_few_labels_recipes_differ_only_where_they_say() -> None:
    """jobs/fashion_mnist_few is the all-labels folder with AT and CRD given kd.yaml's KD term and SSKD's student
    stage its label CE at full weight: every other job resolves to exactly its all-labels spec (so their runs are
    shared), and those three differ in those loss weights alone."""
    from kd_cluster.config import load_job
    from kd_cluster.config.loader import stage_spec, stages_of

    root = Path(__file__).resolve().parent.parent / "jobs"
    few, full = root / "fashion_mnist_few", root / "fashion_mnist"
    assert {p.name for p in few.glob("*.yaml")} == {p.name for p in full.glob("*.yaml")}
    changed: dict[str, dict] = {}
    for path in sorted(few.glob("*.yaml")):
        a, b = load_job(path), load_job(full / path.name)
        assert [s.name for s in stages_of(a)] == [s.name for s in stages_of(b)], path.name
        for sa, sb in zip(stages_of(a), stages_of(b)):
            da = stage_spec(a, sa).model_dump(mode="json", exclude={"stages"})
            db = stage_spec(b, sb).model_dump(mode="json", exclude={"stages"})
            if da != db:
                assert {k for k in da if da[k] != db[k]} == {"method"}, path.name
                changed.setdefault(path.stem, {}).update(
                    {k: v for k, v in da["method"].items() if db["method"].get(k) != v})
    kd = load_job(full / "kd.yaml").method
    same_kd = {"ce_weight": 1 - kd.alpha, "kd_weight": kd.alpha, "temperature": kd.temperature}
    assert changed == {"at": same_kd, "crd": same_kd, "sskd": {"ce_weight": 1.0}}


def test_holm_and_the_win_rule() -> None:
    """Holm's step-down adjustment on a known family; a method wins only with > 2σ and Holm p < 0.05."""
    from kd_cluster.bench.fidelity import Cell, compare, holm, win_counts

    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    assert adj["a"] == 0.03 and adj["c"] == 0.06 and adj["b"] == 0.06 and adj["d"] != adj["d"]  # 3x, 2x, then monotone

    def cells(method: str, values: list[float]) -> list[Cell]:
        return [Cell(method, s, 10, f"{method}{s}", "j", [], v) for s, v in enumerate(values)]

    base = cells("scratch_tuned", [0.80, 0.81, 0.79]) + cells("scratch", [0.70, 0.71, 0.69])
    big = cells("kd", [0.90, 0.91, 0.89])           # far above: > 2σ and p tiny
    noisy = cells("funmatch", [0.70, 0.95, 0.88])   # mean above, spread too large for 2σ
    close = cells("fitnet", [0.815, 0.825, 0.805])  # > 2σ? no: margin 0.015 < 2 x 0.01
    res = compare(base + big + noisy + close)
    assert res[("kd", 10, "")].wins and res[("kd", 10, "")].p_holm < 0.01
    assert not res[("funmatch", 10, "")].wins and not res[("fitnet", 10, "")].wins
    assert res[("scratch", 10, "")].margin < 0  # the untuned baseline is compared with the tuned one too
    from scipy.stats import ttest_ind

    raw = ttest_ind([0.90, 0.91, 0.89], [0.80, 0.81, 0.79], equal_var=False, alternative="greater").pvalue
    assert abs(res[("kd", 10, "")].p - raw) < 1e-12
    assert win_counts(base + big + noisy + close) == {(10, ""): (1, 3)}  # the untuned scratch is not a method


def test_tune_then_fidelity_against_the_tuned_baseline(tmp_path: Path) -> None:
    """bench tune's coordinate search writes a results row per probe and the chosen settings; bench fidelity with
    them trains the tuned scratch student next to the untuned one at every budget (--all-budgets: every method),
    a Shampoo variant at the longest, and a preempted copy of the longest funmatch run, killed twice, that ends
    with the uninterrupted run's weights; `bench table` regenerates the table from runs.csv."""
    write_idx_set(tmp_path / "fm", n_train=300, n_test=40)
    space = tmp_path / "space.yaml"
    space.write_text(f"job: {Path(__file__).resolve().parent.parent / 'jobs' / 'fashion_mnist' / 'scratch.yaml'}\n"
                     "factors:\n  optimizer.lr: [0.006, 0.03]\n  steps_factor: [1, 2]\n")
    env = {**os.environ, "KD_CLUSTER_FASHION_MNIST": str(tmp_path / "fm"), "KD_CLUSTER_CACHE": str(tmp_path / "cache"),
           "WANDB_MODE": "disabled"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "kd_cluster.cli", "bench", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=600, env=env, cwd=tmp_path)
    r = run("tune", str(space), "--budget", "4", "--out", str(tmp_path / "tune"), "--own-images")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    probes = list(csv.DictReader((tmp_path / "tune" / "probes.csv").open()))
    assert [p["round"] for p in probes][:3] == ["0", "1", "1"] and len(probes) in (3, 4, 5, 6)
    assert [p["steps"] for p in probes][:3] == ["4", "4", "8"]
    assert all(0 <= float(p["val_top1"]) <= 1 and 0 <= float(p["own_images_top1"]) <= 1 for p in probes)
    assert sum(p["chosen"] == "1" for p in probes) == 1
    chosen = json.loads((tmp_path / "tune" / "chosen.json").read_text())
    best = max(float(p["val_top1"]) for p in probes)
    assert chosen["val_top1"] == best and chosen["probes"] == len(probes)

    (tmp_path / "chosen.json").write_text(json.dumps({"overrides": ["method.label_smoothing=0.1"], "steps_factor": 2}))
    r = run("fidelity", "--out", str(tmp_path / "out"), "--methods", "funmatch", "--seeds", "0,1", "--budgets", "3,20",
            "--teacher-steps", "3", "--tuned", str(tmp_path / "chosen.json"), "--all-budgets", "--variants", "shampoo",
            "--preempt", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert rows[0]["method"] == "teacher"
    cells = sorted((r["method"], int(r["budget"]), r["variant"], int(r["steps"])) for r in rows[1:] if r["seed"] == "0")
    assert cells == sorted([("scratch", 3, "", 3), ("scratch_tuned", 3, "", 6), ("funmatch", 3, "", 3),
                            ("scratch", 20, "", 20), ("scratch_tuned", 20, "", 40), ("funmatch", 20, "", 20),
                            ("scratch_tuned", 20, "shampoo", 40), ("funmatch", 20, "shampoo", 20)])
    tuned = next(r for r in rows if r["method"] == "scratch_tuned")
    assert "method.label_smoothing=0.1" in tuned["command"] and "schedule.steps=6" in tuned["command"]
    shampoo = next(r for r in rows if r["variant"] == "shampoo")
    assert "optimizer.name=shampoo" in shampoo["command"]
    table = (out / "table.md").read_text()
    assert "| method | steps | seeds | top-1 mean ± std | vs tuned scratch | > 2σ | p (Holm) | wins | per seed |" in table
    assert "| scratch (tuned) + shampoo | 40 | 2 |" in table and "Methods that win" in table
    pre = json.loads((out / "preempted.json").read_text())
    assert len(pre["kills"]) >= 1 and pre["equal"] is True, pre  # a kill drawn late can find the run finished
    r = run("table", str(out / "runs.csv"))
    assert r.returncode == 0 and r.stdout.strip() in table, r.stdout + r.stderr
    r = run("fidelity", "--out", str(out), "--methods", "funmatch", "--seeds", "0,1", "--budgets", "3,20",
            "--teacher-steps", "3", "--tuned", str(tmp_path / "chosen.json"), "--all-budgets", "--variants", "shampoo",
            "--preempt", "2")  # everything finished: reused, and the preempted run's kills are kept, not forgotten
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "preempted.json").read_text())["kills"] == pre["kills"]


def test_prior_runs_stand_in_for_methods_and_scratch_is_the_check(tmp_path: Path) -> None:
    """--prior-runs: a method's row is taken from an earlier runs.csv of the same run (not retrained), marked with
    its source; the from-scratch student is trained again and compared with that file's, in the header."""
    write_idx_set(tmp_path / "fm", n_train=300, n_test=40)
    args = ("--methods", "kd", "--seeds", "0", "--budgets", "3", "--teacher-steps", "3")
    r = bench(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    first = tmp_path / "first.csv"
    first.write_text((tmp_path / "out" / "runs.csv").read_text())
    import shutil

    shutil.rmtree(tmp_path / "out")
    r = bench(tmp_path, *args, "--prior-runs", str(first))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["method"]: x for x in csv.DictReader((tmp_path / "out" / "runs.csv").open())}
    old = {x["method"]: x for x in csv.DictReader(first.open())}
    assert rows["kd"]["source"] == "first.csv" and rows["kd"]["top1"] == old["kd"]["top1"]  # relative to the cwd
    assert not (tmp_path / "out" / "runs" / rows["kd"]["run"]).exists()  # not retrained
    assert rows["scratch"]["source"] == "" and (tmp_path / "out" / "runs" / rows["scratch"]["run"] / "job.json").is_file()
    assert rows["scratch"]["top1"] == old["scratch"]["top1"]  # the same machine gives the same run
    assert "1 of 1 give the same top-1 to 4 digits" in (tmp_path / "out" / "table.md").read_text()
