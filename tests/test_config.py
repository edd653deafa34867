"""Job spec: every file in jobs/ validates; malformed specs give errors that name file, field and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd_cluster.config import SpecError, load_job, stage_spec
from kd_cluster.train import plan_job

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted(p for p in (ROOT / "jobs").rglob("*.yaml") if "base" not in p.parts and "search" not in p.parts)


@pytest.mark.parametrize("job", JOBS, ids=[str(p.relative_to(ROOT)) for p in JOBS])
def test_every_job_file_validates(job: Path) -> None:
    spec = load_job(job)
    plans = plan_job(spec, str(job), check_data="none")
    assert plans and all(p.stage for p in plans)


GOOD = {
    "name": "t",
    "student": {"arch": "cnn_xs"},
    "method": {"name": "supervised"},
    "data": {"train": "builtin://mnist5k/train", "image_size": 28, "batch_size": 8, "loader_workers": 0},
    "schedule": {"steps": 2},
    "optimizer": {"lr": 0.01},
    "resources": {"num_workers": 1},
}


def _write(tmp_path: Path, data: dict, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _err(tmp_path: Path, data: dict, overrides: list[str] | None = None, plan: bool = False) -> str:
    p = _write(tmp_path, data)
    with pytest.raises(SpecError) as ei:
        spec = load_job(p, overrides)
        if plan:
            plan_job(spec, str(p), check_data="local")
    msg = str(ei.value)
    assert str(p) in msg or "command line" in msg
    return msg


def _with(**sections) -> dict:
    import copy

    d = copy.deepcopy(GOOD)
    for k, v in sections.items():
        if v is None:
            d.pop(k, None)
        elif isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def test_good_spec_loads(tmp_path: Path) -> None:
    spec = load_job(_write(tmp_path, GOOD))
    assert spec.student.arch == "cnn_xs" and spec.schedule.steps == 2


def test_unknown_top_level_key_lists_allowed(tmp_path: Path) -> None:
    msg = _err(tmp_path, {**GOOD, "studnet": {"arch": "x"}})
    assert "studnet: unknown field" in msg and "did you mean 'student'" in msg and "optimizer" in msg


def test_unknown_nested_key_names_dotted_field(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(optimizer={"lr": 0.1, "lrr": 0.2}))
    assert "optimizer.lrr: unknown field" in msg and "grad_clip_norm" in msg


def test_wrong_type(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(optimizer={"lr": "fast"}))
    assert "optimizer.lr" in msg and "'fast'" in msg


def test_missing_required_section(tmp_path: Path) -> None:
    assert "student: required field is missing" in _err(tmp_path, _with(student=None))


def test_literal_choices_listed(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(optimizer={"name": "adagrad", "lr": 0.1}))
    assert "optimizer.name" in msg and "'adamw'" in msg and "'sgd'" in msg


def test_steps_and_epochs_exclusive(tmp_path: Path) -> None:
    assert "exactly one of 'steps' or 'epochs'" in _err(tmp_path, _with(schedule={"steps": 3, "epochs": 1}))


def test_batch_not_divisible_by_workers(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(data={"batch_size": 9}, resources={"num_workers": 2}))
    assert "divisible" in msg


def test_bad_run_name(tmp_path: Path) -> None:
    assert "run name" in _err(tmp_path, _with(name="has space/slash"))


def test_crop_scale_order(tmp_path: Path) -> None:
    assert "augment.crop_scale" in _err(tmp_path, _with(augment={"crop_scale": [0.9, 0.1]}))


def test_unknown_model_suggests(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(student={"arch": "resnet5"}), plan=True)
    assert "student.arch" in msg and "resnet5" in msg and "resnet50" in msg


def test_unknown_method_lists_known(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(method={"name": "funmatsh"}), plan=True)
    assert "unknown method 'funmatsh'" in msg and "funmatch" in msg and "kd" in msg


def test_unknown_method_setting_lists_allowed(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(method={"name": "kd", "temp": 3}, teacher={"arch": "cnn_s", "weights": "/x"}), plan=True)
    assert "method.temp" in msg and "temperature" in msg and "alpha" in msg


def test_method_needing_teacher_without_one(tmp_path: Path) -> None:
    assert "needs a teacher" in _err(tmp_path, _with(method={"name": "funmatch"}), plan=True)


def test_missing_local_shards(tmp_path: Path) -> None:
    msg = _err(tmp_path, _with(data={"train": str(tmp_path / "nope" / "manifest.json")}), plan=True)
    assert "data.train" in msg and "nope" in msg


def test_stage_reference_must_exist(tmp_path: Path) -> None:
    d = _with(teacher={"arch": "cnn_s", "weights": "stage:techer"}, method={"name": "funmatch"},
              stages=[{"name": "teacher", "trains": "teacher", "set": {"method": {"name": "supervised"}}},
                      {"name": "distill"}])
    msg = _err(tmp_path, d, plan=True)
    assert "stage:techer" in msg and "earlier stages: teacher" in msg


def test_stage_override_errors_are_located(tmp_path: Path) -> None:
    d = _with(stages=[{"name": "a", "set": {"schedule": {"stepz": 3}}}])
    assert "stages[0].set.schedule.stepz: unknown field" in _err(tmp_path, d)


def test_yaml_is_data_not_code(tmp_path: Path) -> None:
    p = tmp_path / "job.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(p)


def test_extends_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path, GOOD, "base.yaml")
    child = _write(tmp_path, {"extends": "base.yaml", "optimizer": {"lr": 0.5}}, "child.yaml")
    spec = load_job(child, ["schedule.steps=7", "data.image_size=32", "optimizer.betas=[0.8, 0.9]"])
    assert spec.optimizer.lr == 0.5 and spec.schedule.steps == 7 and spec.data.image_size == 32
    assert spec.optimizer.betas == (0.8, 0.9) and spec.student.arch == "cnn_xs"


def test_extends_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    _write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(SpecError, match="cycle"):
        load_job(tmp_path / "a.yaml")


def test_override_of_stage_by_name(tmp_path: Path) -> None:
    d = _with(stages=[{"name": "a", "set": {"schedule": {"steps": 3}}}])
    spec = load_job(_write(tmp_path, d), ["stages.a.set.schedule.steps=5"])
    assert stage_spec(spec, spec.stages[0]).schedule.steps == 5


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="key.sub=value"):
        load_job(_write(tmp_path, GOOD), ["optimizer.lr"])


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    bad = _write(tmp_path, _with(optimizer={"lr": 0.1, "lrr": 1}))
    r = subprocess.run([sys.executable, "-m", "kd_cluster.cli", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "optimizer.lrr" in r.stderr
    good = _write(tmp_path, GOOD, "good.yaml")
    r = subprocess.run([sys.executable, "-m", "kd_cluster.cli", "validate", str(good), "schedule.steps=4"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_profiles_merge_only_when_named(tmp_path) -> None:


    base = tmp_path / "base.yaml"
    base.write_text("name: p\nstudent: {arch: resnet18}\nmethod: {name: supervised}\n"
                    "data: {train: s3://b/train, batch_size: 256}\nschedule: {epochs: 90}\noptimizer: {lr: 0.1}\n"
                    "profiles:\n  smoke:\n    data: {train: builtin://mnist5k/train, batch_size: 32}\n"
                    "    schedule: {steps: 5, epochs: null}\n")
    job = tmp_path / "job.yaml"
    job.write_text("extends: base.yaml\nprofiles:\n  smoke: {student: {arch: cnn_xs}}\n")
    full = load_job(job)
    assert full.data.train == "s3://b/train" and full.schedule.epochs == 90 and full.student.arch == "resnet18"
    smoke = load_job(job, ["data.batch_size=64"], profile="smoke")
    assert smoke.data.train == "builtin://mnist5k/train" and smoke.schedule.steps == 5
    assert smoke.student.arch == "cnn_xs" and smoke.data.batch_size == 64  # child profile merged; overrides last
    with pytest.raises(SpecError, match="profile 'fast' is not defined.*known: smoke"):
        load_job(job, profile="fast")


def test_object_storage_without_credentials_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture, own_output: Any) -> None:
    """botocore's NoCredentialsError is no OSError: it once escaped `run` as a traceback."""
    from kd_cluster.cli import main

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup: loopback only
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    closed = "http://127.0.0.1:7"  # never reached: signing fails first
    spec = load_job(_write(tmp_path, _with(data={"train": "s3://kdc-nocreds/train/manifest.json",
                                                 "endpoint_url": closed})))
    with pytest.raises(SpecError) as ei:
        plan_job(spec, "job.yaml", check_data="all")
    msg = str(ei.value)
    assert "data.train: cannot read manifest 's3://kdc-nocreds/train/manifest.json'" in msg
    assert "Unable to locate credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    assert main(["status", "x", "--storage", "s3://kdc-nocreds/runs"]) == 1
    err = own_output(capsys.readouterr().err)
    assert err.startswith("error: object storage: Unable to locate credentials") and len(err.strip().splitlines()) == 1


def test_one_merge_rule_for_methods_and_stages() -> None:
    """The rule every source of settings goes through: mappings merge, a method naming another method replaces,
    one naming the same (or none) merges, a mapping over the stages list changes the stages it names."""
    from kd_cluster.config import merge

    base = {"method": {"name": "kd", "alpha": 0.5, "temperature": 2.0}, "data": {"batch_size": 8, "train": "x"},
            "stages": [{"name": "a", "set": {"schedule": {"steps": 3}}}, {"name": "b"}]}
    assert merge(base, {"method": {"alpha": 0.1}})["method"] == {"name": "kd", "alpha": 0.1, "temperature": 2.0}
    assert merge(base, {"method": {"name": "kd", "alpha": 0.1}})["method"]["temperature"] == 2.0
    assert merge(base, {"method": {"name": "funmatch"}})["method"] == {"name": "funmatch"}
    assert merge(base, {"data": {"batch_size": 4}})["data"] == {"batch_size": 4, "train": "x"}
    staged = merge(base, {"stages": {"a": {"set": {"schedule": {"warmup_steps": 1}}}}})["stages"]
    assert staged == [{"name": "a", "set": {"schedule": {"steps": 3, "warmup_steps": 1}}}, {"name": "b"}]
    assert merge(base, {"stages": [{"name": "c"}]})["stages"] == [{"name": "c"}]  # a list replaces
    with pytest.raises(SpecError, match="stages.z: no entry named 'z'; entries: a, b"):
        merge(base, {"stages": {"z": {}}})
    assert base["method"]["alpha"] == 0.5 and base["stages"][0]["set"] == {"schedule": {"steps": 3}}  # untouched


def test_a_method_override_reaches_stages_of_the_same_method() -> None:
    """The override the few-labels SSKD probe lost: `method.ce_weight` on the command line, with stages that restate
    `method: {name: sskd, ...}`, now trains the student stage with it; a key a stage sets itself keeps the stage's
    value, and the stage-addressed override changes it."""
    job = ROOT / "jobs" / "fashion_mnist" / "sskd.yaml"
    spec = load_job(job, ["method.ce_weight=1.0", "schedule.steps=40", "stages.head.set.schedule.steps=7"])
    head, student = (stage_spec(spec, s) for s in spec.stages)
    assert student.method.params() == {"init": "stage:head", "ce_weight": 1.0}
    assert head.method.params() == {"phase": "head", "ce_weight": 1.0}
    assert (head.schedule.steps, student.schedule.steps) == (7, 40)


def test_extends_can_change_one_stage_by_name(tmp_path: Path) -> None:
    base = _write(tmp_path, {**GOOD, "stages": [{"name": "teacher", "trains": "teacher"}, {"name": "main"}],
                             "teacher": {"arch": "cnn_s", "weights": "stage:teacher"}}, "base.yaml")
    child = _write(tmp_path, {"extends": base.name, "stages": {"main": {"set": {"schedule": {"steps": 9}}}}})
    spec = load_job(child)
    assert [s.name for s in spec.stages] == ["teacher", "main"]
    assert stage_spec(spec, spec.stages[1]).schedule.steps == 9 and stage_spec(spec, spec.stages[0]).schedule.steps == 2


def test_with_settings_merges_and_validates_again(tmp_path: Path) -> None:
    from kd_cluster.config import with_settings

    spec = load_job(_write(tmp_path, GOOD))
    changed = with_settings(spec, {"resources": {"num_workers": 1}, "data": {"batch_size": 4}})
    assert (changed.data.batch_size, changed.data.train, spec.data.batch_size) == (4, spec.data.train, 8)
    with pytest.raises(Exception, match="batch_size"):
        with_settings(spec, {"data": {"batch_size": 0}})
