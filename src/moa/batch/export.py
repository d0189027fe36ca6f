"""Exports of a batch output in the formats the benchmark tools read.

    alpaca_eval  a JSON list of {instruction, output, generator, dataset}: the model outputs
                 file `alpaca_eval --model_outputs` takes
    mt_bench     FastChat's model-answer JSONL, one {question_id, answer_id, model_id,
                 choices: [{index, turns}], tstamp} per question (data/mt_bench/model_answer/)
    flask        FLASK's model-output JSONL, one {question_id, text, model_id} per item, the
                 file its review scripts read

Rows come out in input order, finished rows only; an export is rewritten whole after every
run, atomically, so it never holds half a file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from moa._files import write_atomically
from moa.batch.rows import Row
from moa.errors import InputFileError, OutputError

__all__ = [
    "ExportFormat",
    "ExportSummary",
    "check_export_path",
    "check_exportable",
    "default_export_path",
    "export",
]

ExportFormat = Literal["alpaca_eval", "mt_bench", "flask"]
_SUFFIX: dict[ExportFormat, str] = {
    "alpaca_eval": ".alpaca_eval.json",
    "mt_bench": ".mt_bench.jsonl",
    "flask": ".flask.jsonl",
}


@dataclass(frozen=True, slots=True)
class ExportSummary:
    path: Path
    written: int
    #: Input rows with no finished answer yet (failed, or not run).
    missing: int


def default_export_path(output: Path, fmt: ExportFormat) -> Path:
    """Beside the output: answers.jsonl → answers.alpaca_eval.json / answers.mt_bench.jsonl."""
    return output.with_name(output.stem + _SUFFIX[fmt])


def check_exportable(rows: Sequence[Row], fmt: ExportFormat, source: Path) -> None:
    """Refuse, before anything runs, an input the format cannot represent."""
    if fmt == "mt_bench":
        return
    for row in rows:
        if len(row.turns) > 1:
            raise InputFileError(
                f"{source} {row.where}: has {len(row.turns)} turns, but {fmt} is "
                "single-turn: use --format mt_bench (or jsonl) for multi-turn rows"
            )


def check_export_path(path: Path) -> None:
    """Refuse, before anything runs, an export that could not be written after the whole run:
    its directory is created and a file is made and removed in it."""
    probe = path.with_name(f".{path.name}.writing")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as error:
        raise OutputError(
            f"{path}: cannot write the export there ({error.strerror or error}): choose another "
            "--export"
        ) from None


def export(
    fmt: ExportFormat,
    path: Path,
    rows: Sequence[Row],
    records: Mapping[str, Mapping[str, Any]],
    *,
    generator: str,
    pipeline: str | None = None,
) -> ExportSummary:
    """Write the finished rows. A row made by the pipeline `pipeline` (a fingerprint) is
    labelled `generator`; one made by another pipeline keeps the generator it was made under."""
    finished = [
        (row, records[row.key]) for row in rows if records.get(row.key, {}).get("ok") is True
    ]

    def label(record: Mapping[str, Any]) -> str:
        own = record.get("generator")
        if pipeline is None or record.get("pipeline") == pipeline or not isinstance(own, str):
            return generator
        return own

    if fmt == "alpaca_eval":
        items = [_alpaca_eval(row, record, label(record)) for row, record in finished]
        text = json.dumps(items, ensure_ascii=False, indent=2) + "\n"
    else:
        line = _mt_bench if fmt == "mt_bench" else _flask
        text = "".join(
            json.dumps(line(row, record, label(record)), ensure_ascii=False) + "\n"
            for row, record in finished
        )
    try:
        write_atomically(path, text)
    except OSError as error:
        raise OutputError(
            f"{path}: cannot write the export ({error.strerror or error}); the answers are "
            "kept in the output file: fix that and rerun the same command to export them"
        ) from None
    return ExportSummary(path=path, written=len(finished), missing=len(rows) - len(finished))


def _alpaca_eval(row: Row, record: Mapping[str, Any], generator: str) -> dict[str, Any]:
    dataset = row.data.get("dataset")
    return {
        "instruction": row.instruction,
        "output": record.get("output", ""),
        "generator": generator,
        # AlpacaEval's own rows name their source set; other inputs have none to give.
        "dataset": dataset if isinstance(dataset, str) else None,
    }


def _mt_bench(row: Row, record: Mapping[str, Any], generator: str) -> dict[str, Any]:
    outputs = record.get("outputs") or [record.get("output", "")]
    # FastChat makes a random id per answer; a stable one keeps reruns byte-identical.
    answer_id = hashlib.sha256(f"{generator}\0{row.key}".encode()).hexdigest()[:22]
    return {
        "question_id": row.id,
        "answer_id": answer_id,
        "model_id": generator,
        "choices": [{"index": 0, "turns": list(outputs)}],
        "tstamp": _timestamp(record.get("finished_at")),
    }


def _flask(row: Row, record: Mapping[str, Any], generator: str) -> dict[str, Any]:
    return {"question_id": row.id, "text": record.get("output", ""), "model_id": generator}


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
