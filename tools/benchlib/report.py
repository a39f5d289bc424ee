"""Summary of the samples: medians, spread, daemon CPU, ratios; a Markdown table and JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .jobs import JOBS, REFERENCE_METRIC, Sample

YARDSTICK = "passthrough"
PLAIN = "plain"


@dataclass
class Row:
    metric: str
    target: str
    unit: str = ""
    n: int = 0
    median: float | None = None
    min: float | None = None
    max: float | None = None
    cpu_norm: float | None = None  # median daemon CPU seconds per GiB or per 1k ops
    cpu_unit: str = ""
    busy: float | None = None  # median daemon CPU / wall time (1.0 = one core saturated)
    vs_yardstick: float | None = None
    vs_plain: float | None = None
    status: str = "ok"  # ok, error, n/a
    errors: tuple[str, ...] = ()


def summarize(samples: Sequence[Sample], targets: Sequence[str], jobs: Sequence[str]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for job in jobs:
        spec = JOBS[job]
        for metric in spec.metrics:
            for target in targets:
                row = Row(metric, target)
                mine = [s for s in samples if s.metric == metric and s.target == target]
                if spec.snapshots_only and not mine:
                    row.status = "n/a"
                good = [s for s in mine if s.error is None and s.value is not None]
                bad = [s for s in mine if s.error is not None]
                if good:
                    values = [s.value for s in good if s.value is not None]
                    row.unit = good[0].unit
                    row.n = len(values)
                    row.median = statistics.median(values)
                    row.min, row.max = min(values), max(values)
                    cpus = [c for c in (s.cpu_norm for s in good) if c is not None]
                    row.cpu_norm = statistics.median(cpus) if cpus else None
                    row.cpu_unit = good[0].cpu_unit
                    busy = [s.cpu / s.seconds for s in good if s.cpu is not None and s.seconds]
                    row.busy = statistics.median(busy) if busy else None
                if bad:
                    row.status = "error"
                    row.errors = tuple(s.error or "" for s in bad)
                if mine or row.status == "n/a":
                    rows[(metric, target)] = row

    def reference(metric: str, target: str) -> float | None:
        ref = rows.get((REFERENCE_METRIC.get(metric, metric), target))
        if ref is None or not ref.median or ref.status == "error":
            return None
        return ref.median

    for row in rows.values():
        if row.median is None:
            continue
        yard, plain = reference(row.metric, YARDSTICK), reference(row.metric, PLAIN)
        row.vs_yardstick = row.median / yard if yard else None
        row.vs_plain = row.median / plain if plain else None
    return list(rows.values())


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table. Ratios are rates divided by the yardstick's and plain's rates
    (higher is better; snapread is compared with seqread). "daemon busy" is the daemon's
    CPU time over the wall time of the timed part (100% = one core)."""
    header = ["job", "target", "result", "spread", "daemon CPU", "daemon busy",
              "vs passthrough", "vs plain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.status == "n/a":
            cells = [row.metric, row.target, "n/a", "", "", "", "", ""]
        elif row.median is None:
            cells = [row.metric, row.target, "ERROR", "", "", "", "", ""]
        else:
            result = f"{_num(row.median)} {row.unit}" + (" (errors)" if row.errors else "")
            spread = ""
            if row.n > 1 and row.median and row.min is not None and row.max is not None:
                spread = f"±{(row.max - row.min) / 2 / row.median * 100:.0f}% (n={row.n})"
            cpu = "—" if row.cpu_norm is None else f"{row.cpu_norm:.3g} {row.cpu_unit}"
            busy = "—" if row.busy is None else f"{row.busy * 100:.0f}%"
            cells = [row.metric, row.target, result, spread, cpu, busy,
                     _ratio(row.vs_yardstick), _ratio(row.vs_plain)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, *, machine: dict[str, object], config: dict[str, object],
               targets: dict[str, dict[str, str]], samples: Sequence[Sample],
               rows: Sequence[Row], errors: Sequence[str]) -> None:
    data = {
        "format": "snapfs-bench/1",
        "machine": machine,
        "config": config,
        "targets": targets,
        "summary": [asdict(r) for r in rows],
        "samples": [{**asdict(s), "cpu_norm": s.cpu_norm, "cpu_unit": s.cpu_unit}
                    for s in samples],
        "errors": list(errors),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
