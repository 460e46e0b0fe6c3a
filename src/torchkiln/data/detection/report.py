"""data_report.json in a detection run's directory: the annotation audit of each data set the run
read, as `data.boxes` handled it when the run started."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchkiln.rundir import DATA_REPORT


def audit_reports(data: Any) -> dict[str, dict[str, Any]]:
    """{annotations file: audit report} of the data sets under the splits (each file once)."""
    from torchkiln.data.wrappers import has_attr, unwrap

    found: dict[str, dict[str, Any]] = {}
    for split in ("train", "val", "test"):
        ds = getattr(data, split, None)
        if ds is None:
            continue
        inner, _ = unwrap(ds, has_attr("audit_report"))
        report = getattr(inner, "audit_report", None)
        if report is not None and inner.source not in found:
            found[inner.source] = report.to_dict()
    return found


def write_data_report(run_dir: Path, data: Any) -> None:
    reports = audit_reports(data)
    if reports:
        (Path(run_dir) / DATA_REPORT).write_text(json.dumps(reports, indent=2, default=str))
