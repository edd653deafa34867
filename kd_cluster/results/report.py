"""One self-contained HTML page (plots embedded as PNG) comparing runs from their metric files and stage markers:
every loss term, the LR, student and teacher top-1, agreement, images/s, data wait, checkpoint stall and upload
time, teacher-actor latency, and every other logged scalar; several runs overlaid; a summary table.

Reads only files: each run's ``job.json`` and ``stage.json`` markers on its storage, and the JSONL metric files
rank 0 wrote (``<telemetry.wandb_dir>/../metrics/<run>/<stage>.jsonl``). No W&B account, no torch.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from kd_cluster.results.store import STAGE_MARKER, metrics_path, run_progress, spec_for_resume, stage_specs
from kd_cluster.storage import Store
from kd_cluster.urls import is_remote, join

NOT_LOSS = {"lr", "images_per_s", "data_wait_s_per_step", "corrupt_samples", "mixup_lambda"}
"""Scalars without a '/' in their name that are not loss terms."""


def is_loss_term(key: str) -> bool:
    """Whether a logged scalar is the loss or one of its weighted terms (un-prefixed, not a rate or an accuracy)."""
    return "/" not in key and key not in NOT_LOSS and not key.endswith("top1")


SKIP = {"step", "time", "data/keys_crc"}
"""Not quantities: the axis, the wall clock, a fingerprint of the samples seen."""


@dataclass(frozen=True)
class Panel:
    """One plot: a title, the metric keys it draws (solid, then dashed, ...) and what it means when absent."""

    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    absent: str = "not logged by these runs"
    log_y: bool = False


FIXED = [
    Panel("student top-1 (val)", ("eval/student_top1",), "top-1"),
    Panel("teacher top-1 (val)", ("eval/teacher_top1",), "top-1", "no stage of these runs evaluated a teacher"),
    Panel("student-teacher agreement", ("eval/agreement", "train/teacher_agreement"),
          "same top class (solid: val, dashed: training batches)", "no stage of these runs has a teacher"),
    Panel("learning rate", ("lr",), "lr"),
    Panel("images/s", ("images_per_s",), "images/s (all workers)"),
    Panel("data wait per step", ("data_wait_s_per_step",), "s"),
    Panel("checkpoint stall", ("checkpoint/stall_s",), "s (training paused)"),
    Panel("checkpoint upload", ("checkpoint/upload_s",), "s (in the background)",
          "no checkpoint upload finished before a log step"),
    Panel("teacher-actor latency", ("teacher/latency_p50_s", "teacher/latency_p95_s"), "s (solid: p50, dashed: p95)",
          "no stage of these runs used teacher actors (teacher.placement: actors)"),
]


@dataclass
class Series:
    """One stage of one run: its label, its metric records and its completion marker."""

    run: str
    stage: str
    trains: str
    arch: str
    method: str
    state: str
    metrics_file: str
    records: list[dict[str, Any]] = field(default_factory=list)
    marker: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return f"{self.run}:{self.stage}"

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key``, finite values only."""
        pts = [(r["step"], float(r[key])) for r in self.records
               if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        return [p[0] for p in pts], [p[1] for p in pts]


def load_series(run: str, run_url: str, endpoint_url: str | None = None,
                metrics_dir: str | None = None) -> list[Series]:
    """Every stage of a run with its metric records (none when the metric file is not here)."""
    spec, _ = spec_for_resume(run_url, endpoint_url)
    states = {s["stage"]: s["state"] for s in run_progress(run_url, endpoint_url)["stages"]}
    out = []
    for name, trains, eff, arch in stage_specs(spec):
        path = metrics_path(eff, name, metrics_dir)
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
        store = Store(join(run_url, name), endpoint_url)
        marker = store.read_json(STAGE_MARKER) if store.exists(STAGE_MARKER) else None
        out.append(Series(run=spec.name, stage=name, trains=trains, arch=arch, method=eff.method.name,
                          state=states.get(name, "?"), metrics_file=str(path), records=records, marker=marker))
    return out


def panels_for(series: list[Series]) -> list[Panel]:
    """The loss panels (total, then each term), the fixed panels, then one panel per other logged scalar."""
    keys: dict[str, None] = {}
    for s in series:
        for r in s.records:
            keys.update(dict.fromkeys(k for k, v in r.items() if isinstance(v, (int, float)) and k not in SKIP))
    fixed_keys = {k for p in FIXED for k in p.keys}
    terms = [k for k in keys if is_loss_term(k) and k != "loss"]
    other = [k for k in keys if k not in fixed_keys and k not in terms and k != "loss"]
    losses = [Panel("loss (sum of the terms)", ("loss",), "loss", log_y=True)]
    losses += [Panel(f"loss term: {k}", (k,), "weighted term", log_y=True) for k in terms]
    return [*losses, *FIXED, *(Panel(k, (k,)) for k in other)]


def plot_png(panel: Panel, series: list[Series], colors: dict[str, Any]) -> bytes | None:
    """The panel as a PNG, or None when no series has any of its keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ("-", "--", ":", "-.")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    drawn = 0
    for s in series:
        for key, style in zip(panel.keys, styles):
            xs, ys = s.curve(key)
            if not xs:
                continue
            many = len(panel.keys) > 1
            ax.plot(xs, ys, style, color=colors[s.label], marker="o" if len(xs) <= 3 else None, markersize=4,
                    linewidth=1.6, label=f"{s.label} ({key})" if many else s.label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    values = [v for s in series for k in panel.keys for v in s.curve(k)[1]]
    if panel.log_y and min(values) > 0 and max(values) / min(values) > 20:  # decades apart, e.g. CE vs KL
        ax.set_yscale("log")
    ax.set_title(panel.title)
    ax.set_xlabel("step (of the stage)")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.0f}"
    return html.escape(str(v))


def _summary_rows(series: list[Series]) -> list[list[str]]:
    rows = []
    for s in series:
        m = s.marker or {}
        fm = m.get("final_metrics", {})
        rows.append([html.escape(s.run), html.escape(s.stage), html.escape(s.trains), html.escape(s.arch),
                     html.escape(s.method), html.escape(s.state), _fmt(m.get("steps")),
                     _fmt(fm.get("eval/student_top1")), _fmt(fm.get("eval/student_top5")),
                     _fmt(fm.get("eval/teacher_top1")), _fmt(fm.get("eval/agreement")),
                     _fmt(m.get("images_per_s"), 0), _fmt(m.get("wall_s"), 1),
                     f"{len(s.records)} records" if s.records else
                     f"<span class=warn>not found: {html.escape(s.metrics_file)}</span>"])
    return rows


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px} table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right} th{background:#f3f3f3}
td:nth-child(-n+6){text-align:left} .grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;padding:4px;width:640px} figcaption{font-size:12px;color:#555}
.absent{width:640px;height:80px;display:flex;align-items:center;justify-content:center;color:#888;
border:1px dashed #ccc;font-size:13px} .warn{color:#b00} code{font-size:12px}
"""


def render(series: list[Series], sources: list[tuple[str, str]]) -> str:
    """The report page for these stages (``sources``: each run's name and URL)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    colors = {s.label: cmap(i % 10) for i, s in enumerate(series)}
    head = ["run", "stage", "trains", "model", "method", "state", "steps", "student top-1", "top-5", "teacher top-1",
            "agreement", "images/s", "wall s", "metrics"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>kd-cluster report: "
             f"{html.escape(', '.join(n for n, _ in sources))}</title><style>{STYLE}</style></head><body>",
             f"<h1>kd-cluster report: {html.escape(', '.join(n for n, _ in sources))}</h1>",
             f"<p>Generated {html.escape(time.strftime('%Y-%m-%d %H:%M:%S %z'))} from "
             + ", ".join(f"<code>{html.escape(u)}</code>" for _, u in sources) + ".</p>",
             "<h2>Summary (final evaluation of each stage)</h2><table><tr>"
             + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in _summary_rows(series)]
    parts.append("</table><h2>Curves</h2><div class=grid>")
    for panel in panels_for(series):
        png = plot_png(panel, series, colors)
        if png is None:
            parts.append(f"<figure><figcaption>{html.escape(panel.title)}</figcaption>"
                         f"<div class=absent>{html.escape(panel.absent)}</div></figure>")
            continue
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt=\"{html.escape(panel.title)}\" width=640 height=360 "
                     f"src=\"data:image/png;base64,{data}\"><figcaption>{html.escape(panel.title)}: "
                     f"{html.escape(', '.join(panel.keys))}</figcaption></figure>")
    parts.append("</div></body></html>\n")
    return "\n".join(parts)


def build_report(runs: list[str], out: str, *, storage: str = "./runs", endpoint_url: str | None = None,
                 metrics_dir: str | None = None) -> dict[str, Any]:
    """Write the report of ``runs`` (names under ``storage`` or run folders/URLs) to ``out``; returns what it
    holds (stages, how many plots, which metric files were missing)."""
    from kd_cluster.results.store import find_run, write_file

    series: list[Series] = []
    sources = []
    for run in runs:
        url = find_run(run, storage, endpoint_url)
        stages = load_series(run, url, endpoint_url, metrics_dir)
        sources.append((stages[0].run if stages else run, url))
        series += stages
    page = render(series, sources)
    url = write_file(out, page.encode(), endpoint_url if is_remote(out) else None)
    return {"out": url, "bytes": len(page), "stages": [s.label for s in series], "plots": page.count("<img "),
            "missing_metrics": [s.metrics_file for s in series if not s.records]}


__all__ = ["FIXED", "Panel", "Series", "build_report", "is_loss_term", "load_series", "panels_for", "plot_png", "render"]
