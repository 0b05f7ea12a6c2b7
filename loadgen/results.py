"""Writing a run's results to its folder: per-request records (JSONL + CSV), metric samples, summary.json."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import orjson

from .runner import RunResult

RECORDS_JSONL = "records.jsonl"
RECORDS_CSV = "records.csv"
METRICS_CSV = "backend_metrics.csv"
SUMMARY_JSON = "summary.json"


def write_json(path: Path, data: Any) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS))


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def write_records(folder: Path, result: RunResult) -> None:
    """records.jsonl (every field, tags nested) and records.csv (flat, tags as JSON) and metric samples."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() for r in result.records]
    with (folder / RECORDS_JSONL).open("wb") as fh:
        for row in rows:
            fh.write(orjson.dumps(row) + b"\n")
    if rows:
        with (folder / RECORDS_CSV).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for row in rows:
                w.writerow({**row, "tags": orjson.dumps(row["tags"]).decode()})
    if result.samples:
        samples = [s.to_dict() for s in result.samples]
        with (folder / METRICS_CSV).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(samples[0]))
            w.writeheader()
            w.writerows(samples)


def read_records(folder: Path) -> list[dict[str, Any]]:
    path = folder / RECORDS_JSONL
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
