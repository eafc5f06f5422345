"""docs/metrics.md, the Grafana dashboard and the code name the same metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bcreditworker_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def documented() -> set[str]:
    rows = [line for line in (ROOT / "docs/metrics.md").read_text().splitlines() if line.startswith("| `")]
    return {row.split("`")[1] for row in rows}


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_every_documented_metric_is_made_by_the_code() -> None:
    source = "\n".join(path.read_text() for path in (ROOT / "creditworker/metrics").glob("*.py"))
    made = {base(name) for name in NAME.findall(source)}
    assert {base(name) for name in documented()} == made


def test_the_dashboard_uses_only_documented_metrics() -> None:
    dashboard = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    used = {base(name) for panel in dashboard["panels"] for target in panel["targets"]
            for name in NAME.findall(target["expr"])}
    assert used and used <= {base(name) for name in documented()}
