"""Summary of the samples: medians, spread, daemon CPU, ratios; a Markdown table and JSON."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .jobs import JOBS, Sample
from .util import MiB

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
    status: str = "ok"  # ok, error
    errors: tuple[str, ...] = ()


def summarize(samples: Sequence[Sample], targets: Sequence[str], jobs: Sequence[str]) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for job in jobs:
        spec = JOBS[job]
        for metric in spec.metrics:
            for target in targets:
                row = Row(metric, target)
                mine = [s for s in samples if s.metric == metric and s.target == target]
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
                if mine:
                    rows[(metric, target)] = row

    def reference(metric: str, target: str) -> float | None:
        ref = rows.get((metric, target))
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
    (higher is better). "daemon busy" is the daemon's
    CPU time over the wall time of the timed part (100% = one core)."""
    header = ["job", "target", "result", "spread", "daemon CPU", "daemon busy",
              "vs passthrough", "vs plain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.median is None:
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


VARIANT_BASE = "snapfs"
VARIANTS = ("snapfs-enc", "snapfs-history")


def variants_of(rows: Sequence[Row]) -> list[str]:
    """The variants present: the fixed ones, then chunk-size ones (snapfs-64k...)."""
    names = list(dict.fromkeys(r.target for r in rows))
    chunked = [n for n in names if re.fullmatch(r"snapfs-[0-9]+k", n)]
    return [*VARIANTS, *chunked]


def variant_rows(rows: Sequence[Row]) -> list[dict[str, object]]:
    """snapfs-enc and snapfs-history against snapfs, metric by metric: the ratio of the
    median rates (above 1.00 is faster) and of the daemon CPU per GiB or per 1k operations
    (above 1.00 costs more)."""
    by_key = {(r.metric, r.target): r for r in rows}
    out: list[dict[str, object]] = []
    metrics = list(dict.fromkeys(r.metric for r in rows))
    for metric in metrics:
        base = by_key.get((metric, VARIANT_BASE))
        if base is None or not base.median:
            continue
        entry: dict[str, object] = {"metric": metric, "unit": base.unit,
                                    VARIANT_BASE: base.median}
        found = False
        for name in variants_of(rows):
            row = by_key.get((metric, name))
            if row is None or row.median is None:
                continue
            found = True
            entry[name] = row.median
            entry[f"{name}/rate"] = row.median / base.median
            # a ratio of the CPU of daemons that were (nearly) idle is noise: left out
            busy = max(row.busy or 0.0, base.busy or 0.0)
            if row.cpu_norm and base.cpu_norm and busy >= 0.05:
                entry[f"{name}/cpu"] = row.cpu_norm / base.cpu_norm
        if found:
            out.append(entry)
    return out


def variant_table(entries: Sequence[dict[str, object]]) -> str:
    present = list(dict.fromkeys(k for e in entries for k in e
                                 if k not in ("metric", "unit", VARIANT_BASE) and "/" not in k))
    if not entries or not present:
        return ""
    header = ["metric", VARIANT_BASE]
    for v in present:
        header += [v, f"{v} / {VARIANT_BASE}", "its daemon CPU / snapfs's"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [str(e["metric"]), f"{_num(float(e[VARIANT_BASE]))} {e['unit']}"]  # type: ignore[arg-type]
        for v in present:
            if v in e:
                cpu = e.get(f"{v}/cpu")
                cells += [f"{_num(float(e[v]))}",  # type: ignore[arg-type]
                          _ratio(e[f"{v}/rate"]),  # type: ignore[arg-type]
                          "—" if cpu is None else _ratio(cpu)]  # type: ignore[arg-type]
            else:
                cells += ["—", "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def request_rows(samples: Sequence[Sample]) -> list[dict[str, object]]:
    """--requests: FUSE requests per operation (per MiB for MiB/s metrics) and the daemon
    CPU per request, summed over the repeats."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        if s.error is None and isinstance(s.extra.get("fuse_requests"), dict):
            groups.setdefault((s.metric, s.target), []).append(s)
    out: list[dict[str, object]] = []
    for (metric, target), group in groups.items():
        counts: dict[str, int] = {}
        for s in group:
            for op, n in s.extra["fuse_requests"].items():  # type: ignore[union-attr]
                counts[op] = counts.get(op, 0) + n
        amount = sum(s.amount or 0 for s in group)
        per = amount / MiB if group[0].per_bytes else amount
        cpus = [s.cpu for s in group]
        total = counts.pop("total", 0)
        entry: dict[str, object] = {
            "metric": metric, "target": target, "per": "MiB" if group[0].per_bytes else "op",
            "requests": total, "per_op": total / per if per else None,
            "by_opcode": {op: n / per for op, n in sorted(counts.items(), key=lambda kv: -kv[1])}
            if per else {},
            "cpu_us_per_request": (sum(cpus) / total * 1e6  # type: ignore[arg-type]
                                   if total and None not in cpus else None),
        }
        out.append(entry)
    return out


def request_table(entries: Sequence[dict[str, object]]) -> str:
    if not entries:
        return ""
    header = ["job", "target", "FUSE requests", "per op (or per MiB)", "by opcode, per op",
              "daemon CPU per request"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        by = e["by_opcode"]
        assert isinstance(by, dict)
        parts = [f"{op} {n:.3g}" for op, n in list(by.items())[:8]]
        per_op = e["per_op"]
        cpu = e["cpu_us_per_request"]
        cells = [str(e["metric"]), str(e["target"]), f"{e['requests']:,}",
                 "—" if per_op is None else f"{per_op:.3g} /{e['per']}",  # type: ignore[str-format]
                 ", ".join(parts), "—" if cpu is None else f"{cpu:.0f} us"]  # type: ignore[str-format]
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
        "variants": variant_rows(rows),
        "requests": request_rows(samples),
        "samples": [{**asdict(s), "cpu_norm": s.cpu_norm, "cpu_unit": s.cpu_unit}
                    for s in samples],
        "errors": list(errors),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
