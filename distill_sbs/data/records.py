"""Distillation records: one example with its gold label and its teachers' outputs.

JSONL format, one record per line (see docs/data.md):

    {"id": "cqa-train-17",
     "input": "<the model input text>",          # or "fields": {...} plus a formatter
     "label": "train station" | null,            # gold label, optional
     "choices": ["bank", "library", ...] | null, # optional
     "teachers": {"palm": [{"rationale": "...", "label": "...", "raw": "..."}, ...]}}

A teacher sample whose output failed to parse is kept with `"rationale": ""`, `"label": null` and
its raw text, so that failures can be counted; any other empty rationale is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from distill_sbs import storage
from distill_sbs.errors import UserError


class RecordError(UserError):
    """A record that cannot be read; the message names the file and line (or the record)."""


@dataclasses.dataclass
class TeacherSample:
    rationale: str
    label: str | None
    raw: str

    @property
    def parsed(self) -> bool:
        """False for a sample whose raw output yielded no rationale (a parse failure)."""
        return bool(self.rationale.strip())


@dataclasses.dataclass
class Record:
    id: str
    input: str
    label: str | None = None
    choices: list[str] | None = None
    teachers: dict[str, list[TeacherSample]] = dataclasses.field(default_factory=dict)
    fields: dict | None = None


def record_to_json(record: Record) -> dict:
    """The JSON object of one record (the inverse of record_from_json)."""
    d: dict[str, Any] = {"id": record.id}
    if record.input or record.fields is None:
        d["input"] = record.input
    if record.fields is not None:
        d["fields"] = record.fields
    d["label"] = record.label
    d["choices"] = record.choices
    d["teachers"] = {
        name: [{"rationale": s.rationale, "label": s.label, "raw": s.raw} for s in samples]
        for name, samples in record.teachers.items()
    }
    return d


def _optional_str(d: dict, key: str, where: str) -> str | None:
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise RecordError(f"{where}: field {key!r} must be a string or null, got {value!r}")
    return value


def _teacher_sample(s: Any, where: str, path: str) -> TeacherSample:
    if not isinstance(s, dict):
        raise RecordError(f"{where}: {path} must be an object with rationale/label/raw, got {s!r}")
    if "rationale" not in s:
        raise RecordError(f"{where}: missing field {path}.rationale")
    rationale = s["rationale"]
    if not isinstance(rationale, str):
        raise RecordError(f"{where}: {path}.rationale must be a string, got {rationale!r}")
    label = _optional_str(s, "label", f"{where}: {path}")
    raw = s.get("raw", rationale)
    if not isinstance(raw, str):
        raise RecordError(f"{where}: {path}.raw must be a string, got {raw!r}")
    if not rationale.strip():
        # The one legitimate empty rationale: a recorded parse failure (no label, raw kept,
        # "" when the teacher answered nothing).
        if label is not None or "raw" not in s:
            raise RecordError(
                f"{where}: {path}.rationale is empty (a sample that failed to parse must have "
                '"label": null and its "raw" text)'
            )
    return TeacherSample(rationale=rationale, label=label, raw=raw)


def record_from_json(d: Any, where: str) -> Record:
    """Validates one JSON object and builds a Record; errors start with `where` ("file:line")."""
    if not isinstance(d, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(d).__name__}")
    if "id" not in d:
        raise RecordError(f"{where}: missing field 'id'")
    rid = d["id"]
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        raise RecordError(f"{where}: field 'id' must be a non-empty string, got {rid!r}")
    fields = d.get("fields")
    if fields is not None and not isinstance(fields, dict):
        raise RecordError(f"{where}: field 'fields' must be an object, got {fields!r}")
    if d.get("input") or (fields is None and "input" in d):
        text = d["input"]
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: field 'input' must be a non-empty string, got {text!r}")
    elif fields is not None:
        text = ""  # filled by the dataset's formatter from `fields`
    else:
        raise RecordError(f"{where}: missing field 'input' (or 'fields' with a formatter)")
    label = _optional_str(d, "label", where)
    choices = d.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise RecordError(
                f"{where}: field 'choices' must be a list of strings, got {choices!r}"
            )
    teachers_json = d.get("teachers") or {}
    if not isinstance(teachers_json, dict):
        raise RecordError(f"{where}: field 'teachers' must be an object, got {teachers_json!r}")
    teachers: dict[str, list[TeacherSample]] = {}
    for name, samples in teachers_json.items():
        if not isinstance(samples, list):
            raise RecordError(
                f"{where}: teachers.{name} must be a list of samples, got {samples!r}"
            )
        teachers[name] = [
            _teacher_sample(s, where, f"teachers.{name}[{i}]") for i, s in enumerate(samples)
        ]
    return Record(
        id=rid, input=text, label=label, choices=choices, teachers=teachers, fields=fields
    )


def iter_json_lines(path: str | os.PathLike, what: str = "a line") -> Iterator[tuple[dict, str]]:
    """(object, "file:line") for each non-blank line of a JSON-lines file.

    A line that is not valid UTF-8 or JSON, or not a JSON object, raises RecordError naming file
    and line.
    """
    path = os.fspath(path)
    # Bytes, decoded line by line: an undecodable byte is reported with its line.
    with storage.Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = _decode_utf8(raw, where)
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: malformed JSON ({_json_problem(line, e)})") from None
            if not isinstance(d, dict):
                raise RecordError(f"{where}: {what} must be a JSON object")
            yield d, where


def _json_problem(line: str, error: json.JSONDecodeError) -> str:
    """json's message and column, naming a trailing comma where there is one (JSON allows none,
    and JSON lines put no comma between objects)."""
    problem = f"{error.msg} at column {error.colno}"
    before = line[: error.pos].rstrip()
    if line[error.pos : error.pos + 1] == "," and error.msg == "Extra data":
        return (
            f"a ',' after the object at column {error.colno}: JSON lines hold one object per line"
        )
    if before.endswith(","):
        return f"{problem}: a trailing ',' at column {len(before)}"
    return problem


def _decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1}); "
            "re-encode the file as UTF-8"
        ) from None


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Reads a JSONL file of records; a bad line raises RecordError("file:line: reason")."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    for d, where in iter_json_lines(path, "a record"):
        record = record_from_json(d, where)
        if record.id in seen:
            raise RecordError(f"{where}: duplicate id {record.id!r} (first at {seen[record.id]})")
        seen[record.id] = where
        records.append(record)
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Writes records one per line (UTF-8, non-ASCII kept as is), all at once: a reader never
    sees half of the file (storage.write_text)."""
    lines = (json.dumps(record_to_json(r), ensure_ascii=False) + "\n" for r in records)
    storage.write_text(os.fspath(path), "".join(lines))
