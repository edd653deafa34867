"""Every benchmark table in the README is generated from a results file a command wrote: each
``<!-- results: PATH [kind] -->`` block equals the table `kd-cluster bench table` makes from PATH, and no
fidelity or tuning row appears outside such a block (a hand-typed or stale row fails here)."""

from __future__ import annotations

import re
from pathlib import Path

from kd_cluster.bench.tables import blocks, render

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ROW = re.compile(r"^\| [^|]+ \| \d+ \| \d+ \| \d\.\d{4} ± \d\.\d{4} \||^\| \d+ \| \d \| ")
"""A fidelity row (method, steps, seeds, mean ± std) or a tuning probe row (#, round)."""


def test_every_results_block_is_its_file_s_table() -> None:
    text = README.read_text()
    found = blocks(text)
    assert found, "the README has no results blocks"
    for b in found:
        assert (ROOT / b.path).is_file(), f"README.md:{b.line}: {b.path} does not exist"
        assert b.text == render(ROOT / b.path, b.kind), (
            f"README.md:{b.line}: the table differs from {b.path}; regenerate it with "
            "`kd-cluster bench table --refresh README.md`")


def test_no_benchmark_row_outside_a_results_block() -> None:
    text = README.read_text()
    inside = set()
    for b in blocks(text):
        inside.update(range(b.line, b.line + b.text.count("\n") + 3))
    stray = [f"README.md:{i}: {line[:80]}" for i, line in enumerate(text.splitlines(), 1)
             if ROW.match(line) and i not in inside]
    assert not stray, stray
