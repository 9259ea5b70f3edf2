"""Accuracy metrics in the SeqIO form `metric_fn(targets, predictions) -> {name: value}`.

Values are percentages (0-100) as in T5 / SeqIO. Predictions are already postprocessed strings
(the answer, not the rationale). A target may be a plain string or, for multiple choice, a dict
{"label": str, "choices": [str, ...]} so that a letter-only prediction "(c)" can be resolved.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

from distill_sbs.parsing import normalize_choice_answer

_BIN_OPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_MAX_EXPRESSION_CHARS = 500  # longer "equations" are degenerate model outputs
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|-?\.\d+")


def safe_eval(expression: str | None) -> float | None:
    """Evaluates numbers, + - * /, unary minus and parentheses; None for anything else.

    Parses with `ast` and walks only the allowed node types: never `eval`. Division by zero,
    overflow, non-finite results and malformed input give None.
    """
    if expression is None:
        return None
    text = expression.strip().replace("×", "*").replace("÷", "/")
    if not text or len(text) > _MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            return _BIN_OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise ValueError(f"disallowed expression node {type(node).__name__}")

    try:
        value = walk(tree)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def parse_number(text: str | None) -> float | None:
    """The last number in `text` ("1,234", "-3.5", "42."), or None."""
    if text is None:
        return None
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def _close(a: float | None, b: float | None, tol: float = 1e-4) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _label(target: Any) -> str:
    return target["label"] if isinstance(target, dict) else target


def _check_lengths(targets: Sequence, predictions: Sequence) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def _percent(hits: Sequence[bool]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def exact_match(prediction: str | None, target: str) -> bool:
    return prediction is not None and prediction.strip() == target.strip()


def equation_match(prediction: str | None, target: str) -> bool:
    """True when both equations evaluate (safely) to the same value."""
    return _close(safe_eval(prediction), safe_eval(target))


def numeric_match(prediction: str | None, target: str) -> bool:
    """True when the last number in the prediction equals the target number."""
    return _close(parse_number(prediction), parse_number(target))


def choice_match(prediction: str | None, target: str, choices: Sequence[str] | None = None) -> bool:
    """True when both name the same choice: "(c) train station" equals "train station"."""
    if prediction is None:
        return False
    p = normalize_choice_answer(prediction, choices)
    t = normalize_choice_answer(target, choices)
    return p is not None and t is not None and _text_key(p) == _text_key(t)


def _text_key(text: str) -> str:
    return " ".join(text.split()).strip(" .").lower()


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy (after stripping surrounding whitespace)."""
    _check_lengths(targets, predictions)
    return {
        "accuracy": _percent(
            [exact_match(p, _label(t)) for t, p in zip(targets, predictions, strict=True)]
        )
    }


def equation_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """SVAMP: the predicted equation evaluates to the gold equation's value; malformed is wrong."""
    _check_lengths(targets, predictions)
    hits = [equation_match(p, _label(t)) for t, p in zip(targets, predictions, strict=True)]
    return {"equation_accuracy": _percent(hits)}


def numeric_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """The last number of the prediction equals the target's number."""
    _check_lengths(targets, predictions)
    hits = [numeric_match(p, _label(t)) for t, p in zip(targets, predictions, strict=True)]
    return {"numeric_accuracy": _percent(hits)}


def multiple_choice_accuracy(
    targets: Sequence[Any], predictions: Sequence[str]
) -> dict[str, float]:
    """Multiple choice: "(c) train station", "train station" and (given choices) "(c)" agree."""
    _check_lengths(targets, predictions)
    hits = []
    for t, p in zip(targets, predictions, strict=True):
        choices = t.get("choices") if isinstance(t, dict) else None
        hits.append(choice_match(p, _label(t), choices))
    return {"accuracy": _percent(hits)}


@dataclasses.dataclass(frozen=True)
class Metric:
    """A dataset's metric: the SeqIO form for whole splits and the per-example form."""

    metric_fn: Callable[[Sequence[Any], Sequence[str]], dict[str, float]]
    # match(prediction, target, choices=None): does one answer count as correct?
    match: Callable[..., bool]


METRICS: dict[str, Metric] = {
    "accuracy": Metric(accuracy, lambda p, t, c=None: exact_match(p, t)),
    "equation": Metric(equation_accuracy, lambda p, t, c=None: equation_match(p, t)),
    "numeric": Metric(numeric_accuracy, lambda p, t, c=None: numeric_match(p, t)),
    "multiple_choice": Metric(multiple_choice_accuracy, choice_match),
}
