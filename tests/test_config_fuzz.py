"""Job files that cannot crash the loader: malformed bytes, YAML and URLs each give exit 2 and one error line
naming the file and the field, and mutations of every job file under jobs/ give exit 0 or exit 2, never a
traceback."""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_cluster.cli import main

ROOT = Path(__file__).resolve().parent.parent
JOBS = sorted(p for p in (ROOT / "jobs").rglob("*.yaml") if "search" not in p.parts)  # search spaces: not jobs
GOOD = ("name: t\nstudent: {arch: cnn_xs}\nmethod: {name: supervised}\n"
        "data: {train: 'builtin://mnist5k/train', image_size: 28, batch_size: 8, loader_workers: 0}\n"
        "schedule: {steps: 2}\noptimizer: {lr: 0.01}\nresources: {num_workers: 1}\n")


def _validate(path: Path) -> tuple[int, str, float]:
    """`kd-cluster validate <path>` in this process: (exit code, stderr, seconds)."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, err.getvalue(), time.perf_counter() - t0


def _one_error(code: int, err: str) -> str:
    """The one error line of a refused file (the problems follow it as '  - ' lines)."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: ") and all(ln.startswith("  - ") for ln in lines[1:]), err
    return err


@pytest.mark.parametrize(("content", "expect"), [
    (b"name: caf\xe9\n", "not UTF-8 text: byte 0xe9 on line 1"),
    (("a: " + "[" * 5000 + "]" * 5000).encode(), "nested more than 32 levels"),
    ("".join("  " * i + f"k{i}:\n" for i in range(200)).encode(), "nested more than 32 levels"),
    (b"a: &a [x,x,x,x,x,x,x,x,x]\n" + b"".join(f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n"
                                               .encode() for i in range(8)), "once its aliases (*name) are expanded"),
    (GOOD.encode() + b"extra: &loop {inner: *loop}\n", "the YAML anchor &loop contains itself"),
    (GOOD.encode() + b"extra: &l [1, [2, *l]]\n", "the YAML anchor &l contains itself"),
    (b"name: t\n" + b"#" * (2 << 20) + b"\n", "a job file may have at most 1048576"),
    (GOOD.encode() + b"1: 2\n", "top level: key 1 is a int"),
    (GOOD.replace("student: {arch: cnn_xs}", "student: {arch: cnn_xs, true: 1}").encode(), "student: key True"),
    (b"name: t\nseed: 2026-13-45\n", "a value cannot be read"),
    (GOOD.encode() + b"storage: {path: 'ftp://[bad'}\n", "storage.path: Value error, is not a valid URL"),
    (GOOD.replace("builtin://mnist5k/train", "nope://x/train").encode(), "data.train: Value error, no filesystem "
                                                                         "for protocol 'nope'"),
    (GOOD.replace("builtin://mnist5k/train", "s3:///train").encode(), "data.train: Value error, names no bucket"),
    (GOOD.encode() + b"teacher: {arch: cnn_s, weights: 'http://h:port/t.safetensors'}\n",
     "teacher.weights: Value error, is not a valid URL"),
])
def test_malformed_job_file_is_exit_2_with_one_error_line(tmp_path: Path, content: bytes, expect: str) -> None:
    p = tmp_path / "job.yaml"
    p.write_bytes(content)
    code, err, seconds = _validate(p)
    assert expect in _one_error(code, err) and str(p) in err
    assert seconds < 10


def test_protocol_not_installed_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "zzfs", {"class": "zz_not_installed.ZzFileSystem",
                                                        "err": "Install zz-fs to access ZZ"})
    assert importlib.util.find_spec("zz_not_installed") is None
    p = tmp_path / "job.yaml"
    p.write_text(GOOD + "teacher: {placement: stored, labels: 'zzfs://bucket/labels', arch: cnn_s}\n")
    err = _one_error(*_validate(p)[:2])
    assert "teacher.labels: Value error, protocol 'zzfs' is not installed here: Install zz-fs to access ZZ" in err


# --- property: every job file, mutated ----------------------------------------------------------------------------

VALUES = ["[]", "{}", "null", "-1", "0", "1e999", "'ftp://[bad'", "''", "true", "[1, [2, [3]]]", "'s3://'",
          "&x [a]", "*x", "\"\\xff\"", "'nope://a/b'", "2026-13-45", "!!binary AAAA", "{1: 2}", "'\\0'"]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[Path, bytes]:
    job = draw(st.sampled_from(JOBS))
    data = bytearray(job.read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "drop_line", "swap_value", "nest", "truncate", "insert_bytes"]))
        lines = bytes(data).split(b"\n")
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "drop_line":
            del lines[draw(st.integers(0, len(lines) - 1))]
            data = bytearray(b"\n".join(lines))
        elif kind == "swap_value":
            keyed = [i for i, ln in enumerate(lines) if b":" in ln and not ln.lstrip().startswith(b"#")]
            if keyed:
                i = draw(st.sampled_from(keyed))
                key = lines[i].split(b":", 1)[0]
                lines[i] = key + b": " + draw(st.sampled_from(VALUES)).encode()
                data = bytearray(b"\n".join(lines))
        elif kind == "nest":
            keyed = [i for i, ln in enumerate(lines) if b":" in ln and not ln.lstrip().startswith(b"#")]
            if keyed:
                i = draw(st.sampled_from(keyed))
                n = draw(st.integers(1, 3000))
                key = lines[i].split(b":", 1)[0]
                opener, closer = draw(st.sampled_from([(b"{a: ", b"}"), (b"[", b"]"), (b"[{a: ", b"}]")]))
                lines[i] = key + b": " + opener * n + b"x" + closer * n
                data = bytearray(b"\n".join(lines))
        elif kind == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return job, bytes(data)


@pytest.fixture(scope="module")
def jobs_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of jobs/, so a mutated file sits where its original is (its extends: paths still resolve)."""
    d = tmp_path_factory.mktemp("jobs") / "jobs"
    shutil.copytree(ROOT / "jobs", d)
    return d


@settings(derandomize=True, max_examples=120, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=mutations())
def test_mutated_job_files_give_exit_0_or_2_and_never_a_traceback(jobs_copy: Path, case: tuple[Path, bytes]) -> None:
    job, content = case
    p = jobs_copy / job.relative_to(ROOT / "jobs").parent / "mutated.yaml"
    p.write_bytes(content)
    code, err, seconds = _validate(p)  # any exception escaping main() fails the test with its traceback
    if code != 0:
        _one_error(code, err)
    assert seconds < 20, f"{seconds:.1f} s for one file"
