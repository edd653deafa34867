"""`kd-cluster bench table`: the markdown tables of results files, as the benchmarks write them (the README's
tables are these, and a test regenerates each from its file)."""

from __future__ import annotations

from pathlib import Path

from kd_cluster.bench.fidelity import markdown_table, read_csv
from kd_cluster.bench.tune import probes_table, read_probes


def render(path: str | Path) -> str:
    """The table of a ``runs.csv`` (bench fidelity: every method against the baseline) or of a ``probes.csv``
    (bench tune: every probe)."""
    p = Path(path)
    with p.open() as f:
        header = f.readline()
    if header.startswith("probe,"):
        return probes_table(read_probes(p))
    cells, teacher_top1, teacher_steps = read_csv(p)
    return markdown_table(cells, teacher_top1, teacher_steps)


def render_all(paths: list[str]) -> str:
    """Every file's table, in order, a blank line apart."""
    return "\n\n".join(render(p) for p in paths)


__all__ = ["render", "render_all"]
