"""Reader for the Distilling Step-by-Step release layout.

    <dir>/<name>_train.json          one JSON object per line (CQA, e-SNLI, ANLI) ...
    <dir>/<name>_valid.json          (optional; read as the "validation" split)
    <dir>/<name>_test.json
    <dir>/llm/<split>_CoT_<i>.json   a JSON list of teacher (PaLM) output strings, i = 0, 1, ...;
                                     concatenated in order they align with the data lines

Input formats follow the paper's code: CQA is the question then "Answer Choices:" (a)..(e);
SVAMP is its "input" (body, newline, question) with the equation as label; e-SNLI / ANLI are
"premise: ... hypothesis: ..." (the reference joins them with T5's EOS string, which a
SentencePiece tokenizer would split into characters, so we name the parts instead).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

from absl import logging

from distill_sbs import storage
from distill_sbs.data.records import Record, RecordError, TeacherSample, iter_json_lines
from distill_sbs.parsing import normalize_choice_answer, parse_chain_of_thought

# (row, where) -> (input text, gold label or None, choices or None)
RowFormatter = Callable[[dict, str], tuple[str, str | None, list[str] | None]]

SPLIT_FILES = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
_NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}
_LLM_FILE = re.compile(r"^(?P<split>\w+?)_CoT_(?P<index>\d+)\.json$")


@dataclasses.dataclass(frozen=True)
class ParseStats:
    """How many teacher outputs of one split parsed into (rationale, answer)."""

    dataset: str
    split: str
    outputs: int
    parsed: int

    @property
    def failed(self) -> int:
        return self.outputs - self.parsed

    @property
    def rate(self) -> float:
        return self.parsed / self.outputs if self.outputs else 0.0


def _require(row: dict, key: str, where: str):
    if key not in row:
        raise RecordError(f"{where}: missing field {key!r}")
    return row[key]


def format_cqa(row: dict, where: str) -> tuple[str, str | None, list[str] | None]:
    question = _require(row, "question", where)
    choices = _require(row, "choices", where)
    if not isinstance(choices, list) or not choices:
        raise RecordError(f"{where}: field 'choices' must be a non-empty list, got {choices!r}")
    lines = [f"({chr(ord('a') + i)}) {c}" for i, c in enumerate(choices)]
    text = f"{question}\nAnswer Choices:\n" + "\n".join(lines)
    return text, row.get("answer"), list(choices)


def format_input_label(row: dict, where: str) -> tuple[str, str | None, list[str] | None]:
    text = _require(row, "input", where)
    label = row.get("label")
    return text, None if label is None else str(label), row.get("choices")


def format_svamp(row: dict, where: str) -> tuple[str, str | None, list[str] | None]:
    if "input" in row:
        return format_input_label(row, where)
    # The original SVAMP.json rows: body, newline, question; the equation is the label.
    text = f"{_require(row, 'Body', where)}\n{_require(row, 'Question', where)}"
    return text, _require(row, "Equation", where), None


def format_nli(row: dict, where: str) -> tuple[str, str | None, list[str] | None]:
    premise = _require(row, "premise", where)
    hypothesis = _require(row, "hypothesis", where)
    label = row.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        if label not in _NLI_LABELS:  # -1 marks unlabeled pairs in e-SNLI / ANLI
            label = None
        else:
            label = _NLI_LABELS[label]
    return f"premise: {premise} hypothesis: {hypothesis}", label, None


FORMATS: dict[str, RowFormatter] = {
    "cqa": format_cqa,
    "svamp": format_svamp,
    "esnli": format_nli,
    "anli1": format_nli,
}


def detect_format(row: dict, where: str) -> RowFormatter:
    """Picks the formatter of a row in an unknown dataset from its field names."""
    if "question" in row and "choices" in row:
        return format_cqa
    if "premise" in row and "hypothesis" in row:
        return format_nli
    if "input" in row:
        return format_input_label
    if "Body" in row and "Question" in row:
        return format_svamp
    raise RecordError(
        f"{where}: cannot tell the format of this row (fields {sorted(row)}); expected "
        "question+choices, premise+hypothesis, input(+label) or Body+Question"
    )


def data_file(directory: str, name: str, split: str) -> str:
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    return storage.join(directory, f"{name}_{SPLIT_FILES[split]}.json")


def llm_files(directory: str, split: str) -> list[str]:
    """The files llm/<split>_CoT_<i>.json in index order; their indices must be 0..n-1."""
    llm_dir = storage.join(directory, "llm")
    if not storage.isdir(llm_dir):
        return []
    want = SPLIT_FILES[split]
    found = {}
    for fname in storage.listdir(llm_dir):
        m = _LLM_FILE.match(fname)
        if m and m.group("split") == want:
            found[int(m.group("index"))] = storage.join(llm_dir, fname)
    missing = [i for i in range(len(found)) if i not in found]
    if missing:
        raise RecordError(
            f"{llm_dir}: {want}_CoT_{missing[0]}.json is missing "
            f"(found indices {sorted(found)}; files must be numbered 0, 1, ...)"
        )
    return [found[i] for i in range(len(found))]


def read_llm_outputs(files: list[str]) -> list[str]:
    outputs: list[str] = []
    for path in files:
        try:
            items = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise RecordError(f"{path}: expected a JSON list of output strings")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise RecordError(f"{path}: item {i} is not a string: {item!r:.80}")
        outputs.extend(items)
    return outputs


def _read_rows(path: str) -> list[tuple[dict, str]]:
    """Rows of a data file: JSON lines (the release) or one JSON list (SVAMP.json style)."""
    text = storage.read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        return [(item, f"{path}: item {i}") for i, item in enumerate(items)]
    return list(iter_json_lines(path, "a row"))


def teacher_label(answer: str | None, choices: list[str] | None, nli: bool = False) -> str | None:
    """The teacher's label from its parsed answer ("(c) x" -> the choice "x"; NLI lower-cased)."""
    if answer is None:
        return None
    if nli:
        return answer.strip().lower()
    return normalize_choice_answer(answer, choices) if choices else answer


def read_dss_split(
    directory: str,
    name: str,
    split: str,
    *,
    teacher: str = "palm",
    formatter: RowFormatter | None = None,
) -> tuple[list[Record], ParseStats | None]:
    """Records of one split with the teacher's parsed outputs, and the split's parse counts.

    A teacher output without an answer is a parse failure: it is kept as a sample with an empty
    rationale, no label and its raw text, and counted in the returned ParseStats (None when the
    split has no llm/ files).
    """
    path = data_file(directory, name, split)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such file (DSS layout: <dir>/<name>_<split>.json)")
    rows = _read_rows(path)
    files = llm_files(directory, split)
    outputs = read_llm_outputs(files) if files else None
    if outputs is not None and len(outputs) != len(rows):
        raise RecordError(
            f"{path}: {len(rows)} examples but {len(outputs)} teacher outputs in "
            f"{storage.Path(files[0]).parent}/{SPLIT_FILES[split]}_CoT_*.json "
            f"({len(files)} files); they must align one to one, in order"
        )
    fmt = formatter or FORMATS.get(name)
    records: list[Record] = []
    parsed = 0
    for i, (row, where) in enumerate(rows):
        row_fmt = fmt or detect_format(row, where)
        text, label, choices = row_fmt(row, where)
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: empty input text")
        rid = str(row.get("id", row.get("ID", row.get("uid", f"{name}-{split}-{i}"))))
        teachers: dict[str, list[TeacherSample]] = {}
        if outputs is not None:
            out = parse_chain_of_thought(outputs[i])
            if out.answer is not None and out.rationale:
                parsed += 1
                answer = teacher_label(out.answer, choices, nli=row_fmt is format_nli)
                sample = TeacherSample(out.rationale, answer, out.raw)
            else:
                sample = TeacherSample("", None, out.raw)
            teachers[teacher] = [sample]
        records.append(Record(id=rid, input=text, label=label, choices=choices, teachers=teachers))
    stats = None
    if outputs is not None:
        stats = ParseStats(name, split, len(outputs), parsed)
        # A parse failure drops the sample from training: at WARNING, which the CLI shows.
        logging.log(
            logging.WARNING if stats.failed else logging.INFO,
            "%s/%s: %d of %d teacher outputs parsed (%.2f%%), %d failures kept raw",
            name,
            split,
            parsed,
            len(outputs),
            100 * stats.rate,
            stats.failed,
        )
    return records, stats
