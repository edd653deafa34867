"""Metrics out of the training loop: W&B (rank 0, imported lazily), a local JSONL file, terminal progress.

Nothing here is called on ranks other than 0, and nothing here is called between log steps.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from kd_cluster.config import TelemetrySpec


class Sink(Protocol):
    """Receives metric dicts at log steps."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def wandb_run_id(run_name: str) -> str:
    """W&B run ids allow letters, digits, '-', '_' and '.' only; the run name is one already."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", run_name)[:64]


def resolve_wandb_mode(spec: TelemetrySpec) -> str:
    """auto -> online when an API key is in the environment, else offline."""
    if spec.wandb_mode != "auto":
        return spec.wandb_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbSink:
    """One W&B run per job (id = run name, resume allowed); stages log under their own prefix."""

    def __init__(self, spec: TelemetrySpec, run_name: str, config: dict[str, Any], step_offset: int) -> None:
        import wandb  # lazy: only rank 0 of a run with W&B enabled pays for it

        self.mode = resolve_wandb_mode(spec)
        Path(spec.wandb_dir).mkdir(parents=True, exist_ok=True)
        self.step_offset = step_offset
        self.run = wandb.init(
            project=spec.wandb_project, entity=spec.wandb_entity, id=wandb_run_id(run_name), name=run_name,
            resume="allow", mode=self.mode, dir=spec.wandb_dir, config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.url = getattr(self.run, "url", None) if self.mode == "online" else None
        self.dir = str(Path(self.run.dir).parent) if self.run is not None else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=self.step_offset + step)

    def close(self) -> None:
        self.run.finish()


class JsonlSink:
    """Appends one JSON object per log step to a local file.

    On resume, records past the resumed step (logged after the last checkpoint, before the stop)
    are dropped first, so the file's step axis never repeats.
    """

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(k + "\n" for k in kept))
        self.f = path.open("a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class Progress:
    """Terminal progress of rank 0: a tqdm bar in an interactive process, one line per log step otherwise."""

    def __init__(self, stage: str, total: int, start: int, bar: bool) -> None:
        self.stage, self.total = stage, total
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last = start

    def log(self, step: int, metrics: dict[str, float]) -> None:
        keys = [k for k in ("loss", "lr", "images_per_s", "eval/student_top1") if k in metrics]
        text = " ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in keys)
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix_str(text, refresh=False)
        else:
            # sys.stdout directly: Ray Train patches print() into its logger, which may echo it twice
            sys.stdout.write(f"[{self.stage}] step {step}/{self.total} {text}\n")
            sys.stdout.flush()
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Fanout:
    """Sends each log call to several sinks, prefixing keys with the stage name for W&B."""

    def __init__(self, sinks: list[Sink], prefixed: list[Sink], prefix: str) -> None:
        self.sinks, self.prefixed, self.prefix = sinks, prefixed, prefix

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log(step, metrics)
        if self.prefixed:
            pm = {f"{self.prefix}/{k}": v for k, v in metrics.items()}
            for s in self.prefixed:
                s.log(step, pm)

    def close(self) -> None:
        for s in (*self.sinks, *self.prefixed):
            s.close()


class NullSink:
    """What ranks other than 0 get."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = ["Fanout", "JsonlSink", "NullSink", "Progress", "Sink", "WandbSink", "resolve_wandb_mode", "wandb_run_id"]
