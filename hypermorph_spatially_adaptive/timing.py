"""Wall time per pipeline stage: what ``run_pipeline.py`` prints at the end and saves as
``stage_times.csv`` in its ``--out`` folder (``artifacts.STAGE_TIMES``)."""
from __future__ import annotations

import csv
import time
from contextlib import contextmanager
from typing import Iterator, List, Tuple

__all__ = ["StageTimer"]


class StageTimer:
    """Collects ``(stage, seconds, counted)`` rows. ``counted`` rows add up to the total; the
    others are details of a counted row (e.g. each model of a parallel training)."""

    def __init__(self) -> None:
        self.rows: List[Tuple[str, float, bool]] = []
        self.t0 = time.time()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (recorded also when it raises)."""
        t = time.time()
        try:
            yield
        finally:
            self.record(name, time.time() - t)

    def record(self, name: str, seconds: float, counted: bool = True) -> None:
        self.rows.append((name, float(seconds), counted))

    def total(self) -> float:
        """Wall seconds since the timer was made (stages plus what ran between them)."""
        return time.time() - self.t0

    def table(self) -> str:
        """The rows as a text table with minutes and the share of the total."""
        total = self.total()
        width = max([len(n) for n, _, _ in self.rows] + [len("total")])
        lines = [f"{'stage':<{width}}  {'min':>6}  {'share':>6}"]
        for name, sec, counted in self.rows:
            share = f"{100 * sec / total:5.1f}%" if counted and total > 0 else ""
            lines.append(f"{name:<{width}}  {sec / 60:6.2f}  {share:>6}")
        other = total - sum(sec for _, sec, c in self.rows if c)
        lines.append(f"{'(between stages)':<{width}}  {other / 60:6.2f}  {100 * other / max(total, 1e-9):5.1f}%")
        lines.append(f"{'total':<{width}}  {total / 60:6.2f}  100.0%")
        return "\n".join(lines)

    def write_csv(self, path: str) -> None:
        """``stage, seconds, counted`` per row plus a ``total`` row."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["stage", "seconds", "counted_in_total"])
            for name, sec, counted in self.rows:
                w.writerow([name.strip(), f"{sec:.1f}", int(counted)])
            w.writerow(["total", f"{self.total():.1f}", 0])
