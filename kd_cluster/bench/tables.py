"""`kd-cluster bench table`: the markdown tables of results files, as the benchmarks write them (the README's
tables are these, and a test regenerates each from its file)."""

from __future__ import annotations

from pathlib import Path

import re
from dataclasses import dataclass

from kd_cluster.bench.fidelity import agreement_table, fit_table, markdown_table, read_csv
from kd_cluster.bench.tune import probes_table, read_probes

KINDS = ("main", "agreement", "fit")


def render(path: str | Path, kind: str = "main") -> str:
    """The table of a ``runs.csv`` (bench fidelity: ``main``, every method against the baseline; ``agreement``, the
    function-matching family's agreement with the teacher; ``fit``, own-images against eval top-1) or of a
    ``probes.csv`` (bench tune: every probe)."""
    p = Path(path)
    with p.open() as f:
        header = f.readline()
    if header.startswith("probe,"):
        return probes_table(read_probes(p))
    cells, teacher_top1, teacher_steps = read_csv(p)
    if kind == "agreement":
        return agreement_table(cells)
    if kind == "fit":
        return fit_table(cells)
    return markdown_table(cells, teacher_top1, teacher_steps)


@dataclass(frozen=True)
class Block:
    """A table in a document that a results file generates: ``<!-- results: PATH [kind] -->`` ... ``<!-- /results -->``."""

    path: str
    kind: str
    text: str
    line: int


BLOCK = re.compile(r"^<!-- results: (\S+)(?: (\w+))? -->\n(.*?)^<!-- /results -->", re.M | re.S)


def blocks(document: str) -> list[Block]:
    """Every results block of a markdown document, in order."""
    return [Block(m.group(1), m.group(2) or "main", m.group(3).strip(), document.count("\n", 0, m.start()) + 1)
            for m in BLOCK.finditer(document)]


def refresh(document: str, root: Path) -> str:
    """``document`` with every results block's table generated again from its file (paths relative to ``root``)."""
    return BLOCK.sub(lambda m: f"<!-- results: {m.group(1)}{f' {m.group(2)}' if m.group(2) else ''} -->\n"
                               f"{render(root / m.group(1), m.group(2) or 'main')}\n<!-- /results -->", document)


def render_all(paths: list[str]) -> str:
    """Every file's table, in order, a blank line apart."""
    return "\n\n".join(render(p) for p in paths)


__all__ = ["Block", "blocks", "refresh", "render", "render_all"]
