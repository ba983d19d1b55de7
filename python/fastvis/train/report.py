"""What a run shows and leaves behind: the metrics log, progress display and the plot.

* ``metrics.jsonl``: one JSON object per line. Training records ``{"kind": "train", "step",
  "epoch", "loss", "lr", "img_s", "time"}`` (``loss`` the mean over the steps since the
  previous record, averaged over ranks; ``step`` the number of optimizer steps done),
  validation records ``{"kind": "val", "step", "epoch", "val_loss", "val_top1",
  "val_top5"}`` (and ``ema_val_*`` with model EMA). Each line is written and flushed
  whole; on resume the log is cut back to the checkpoint's step (records after it, and a
  line torn by a kill, are dropped) so the resumed run continues it without duplicates.
* Progress: a rich progress bar (loss, lr, img/s, ETA) on a terminal; with ``quiet`` (or
  without rich) one plain line per record, for log files.
* ``plot.png``: loss and validation accuracy against the step (matplotlib; skipped with a
  message if it is not installed).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

from .checkpoint import atomic_write_bytes

__all__ = ["MetricsLog", "read_metrics", "Progress", "plot_metrics"]


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics file (lines that do not parse, e.g. torn by a kill, skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


class MetricsLog:
    def __init__(self, path: str, resume_step: Optional[int] = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            self._f = None
            return
        if resume_step is None:
            recs: List[Dict[str, Any]] = []
        else:
            recs = [r for r in read_metrics(path) if int(r.get("step", 0)) <= resume_step]
            # a validation record at the resume step belongs to an epoch the checkpoint
            # closed; keep it. Training records after the checkpoint are redone.
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in recs).encode())
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Per-epoch progress. ``rich`` bars unless quiet / not installed / not enabled."""

    def __init__(self, enabled: bool = True, quiet: bool = False, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self._rich = None
        if enabled and not quiet:
            try:
                import rich.progress  # noqa: F401
                self._rich = True
            except ImportError:
                self._rich = None
        self._progress = None
        self._task = None
        self._t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if not self.enabled or not self._rich:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = RichProgress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, loss="-", lr="-", ips="-")

    def update(self, done: int, loss: float, lr: float, ips: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}")

    def record(self, rec: Dict[str, Any], total_steps: int) -> None:
        """A plain line per training record (quiet mode / no rich)."""
        if not self.enabled or self._progress is not None:
            return
        step = rec["step"]
        elapsed = time.perf_counter() - self._t0
        print(f"epoch {rec['epoch'] + 1} step {step}/{total_steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
              f"{rec['img_s']:.0f} img/s  elapsed {_fmt_time(elapsed)}", file=self.stream, flush=True)

    def end_epoch(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def plot_metrics(records: List[Dict[str, Any]], path: str) -> Optional[str]:
    """Writes the loss / accuracy figure; returns None, or a message saying why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib, or 'fastvis[train]')"
    tr = [r for r in records if r.get("kind") == "train"]
    va = [r for r in records if r.get("kind") == "val"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if tr:
        a1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
    if va:
        a1.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="val loss")
        a2.plot([r["step"] for r in va], [r["val_top1"] for r in va], "o-", label="val top-1")
        a2.plot([r["step"] for r in va], [r["val_top5"] for r in va], "s--", label="val top-5")
        if "ema_val_top1" in va[0]:
            a2.plot([r["step"] for r in va], [r["ema_val_top1"] for r in va], "^-", label="EMA val top-1")
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.set_yscale("log")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.set_xlabel("step")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return None
