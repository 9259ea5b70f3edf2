"""Model-feature batches in numpy, without TensorFlow or SeqIO: the rows
`ObjectiveEncDecFeatureConverter` (seqio's packing or padding) makes of the same examples.

For hosts where TensorFlow cannot be installed (GPU machines that carry only jax, torch and
sentencepiece): the benchmarks' fixed-shape batches and packed rows of tokenised records.

    examples = encode_examples(text_examples, sentencepiece_encoder(path), lengths)
    for batch in build_batches(examples, lengths, batch_size=8, pack=True): ...

An example is {"inputs": ids, "targets": ids, "objective_id": int}, its ids ending in EOS as the
tasks' preprocessors leave them. Packing follows seqio's (`seqio.utils.trim_and_pack_dataset`
without custom ops) to the token: examples are taken in windows of max(feature lengths), each
window packed greedily into one open row that is written out when the next example does not fit
and at the window's end; a sequence's length is its count of non-zero ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from distill_sbs.network import EOS_ID

Example = Mapping[str, Any]
Row = dict[str, np.ndarray]

_OBJECTIVES = "targets_objective"  # the objective id + 1 over the target tokens, as the converter


def sentencepiece_encoder(model_file: str) -> Callable[[str], list[int]]:
    """Text -> ids with a SentencePiece model (what seqio's vocabulary encodes with)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    return lambda text: processor.encode(text)


def encode_examples(
    text_examples: Iterable[Mapping[str, Any]],
    encode: Callable[[str], Sequence[int]],
    lengths: Mapping[str, int],
) -> list[dict[str, Any]]:
    """Text examples ({"inputs", "targets", "objective_id"}) as the tasks tokenise them: ids
    cut to the feature length less one, then EOS (seqio's append_eos_after_trim)."""

    def ids(text: str, length: int) -> np.ndarray:
        return np.asarray([*list(encode(text))[: length - 1], EOS_ID], np.int32)

    return [
        {
            "inputs": ids(e["inputs"], lengths["inputs"]),
            "targets": ids(e["targets"], lengths["targets"]),
            "objective_id": int(e["objective_id"]),
        }
        for e in text_examples
    ]


def _sequences(example: Example, lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The example's packed features, trimmed; the objective broadcast over the targets."""
    targets = np.asarray(example["targets"], np.int32)[: lengths["targets"]]
    return {
        "inputs": np.asarray(example["inputs"], np.int32)[: lengths["inputs"]],
        "targets": targets,
        _OBJECTIVES: np.full(len(targets), int(example["objective_id"]) + 1, np.int32),
    }


def _shift_right(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(1, x.dtype), x[:-1]])


def _model_features(f: Mapping[str, np.ndarray], packed: bool) -> Row:
    """seqio.EncDecFeatureConverter._convert_example plus the objective ids, for one row."""
    targets = f["targets"]
    decoder_inputs = _shift_right(targets)
    if packed:  # each packed sequence starts from 0, not from the previous one's EOS
        seg = f["targets_segment_ids"]
        decoder_inputs = decoder_inputs * (seg == _shift_right(seg))
    row = {
        "encoder_input_tokens": f["inputs"],
        "decoder_target_tokens": targets,
        "decoder_input_tokens": decoder_inputs,
        "decoder_loss_weights": (targets != 0).astype(np.int32),
        "decoder_objective_ids": np.maximum(f[_OBJECTIVES] - 1, 0),
    }
    if packed:
        row["encoder_segment_ids"] = f["inputs_segment_ids"]
        row["decoder_segment_ids"] = f["targets_segment_ids"]
        row["encoder_positions"] = f["inputs_positions"]
        row["decoder_positions"] = f["targets_positions"]
    return {k: v.astype(np.int32) for k, v in row.items()}


def _write_row(parts: list[dict[str, np.ndarray]], lengths: Mapping[str, int]) -> Row:
    features = {}
    for k, length in lengths.items():
        seqs = [p[k] for p in parts]
        tokens = np.zeros(length, np.int32)
        positions = np.zeros(length, np.int32)
        n = sum(len(s) for s in seqs)
        if seqs:
            tokens[:n] = np.concatenate(seqs)
            positions[:n] = np.concatenate([np.arange(len(s)) for s in seqs])
        features[k] = tokens
        features[f"{k}_positions"] = positions
        # seqio's formula: a new segment wherever a position is 0, kept on non-zero tokens only
        features[f"{k}_segment_ids"] = np.cumsum(positions == 0) * (tokens != 0)
    return _model_features(features, packed=True)


def pack_rows(examples: Iterable[Example], lengths: Mapping[str, int]) -> list[Row]:
    """Packed rows (encoder/decoder tokens, segment ids, positions, loss weights, objective ids)
    of `examples` in order; `lengths` = {"inputs": ..., "targets": ...}."""
    lengths = {"inputs": lengths["inputs"], "targets": lengths["targets"]}
    lengths[_OBJECTIVES] = lengths["targets"]
    window = max(lengths.values())
    rows: list[Row] = []
    examples = list(examples)
    for start in range(0, len(examples), window):
        parts: list[dict[str, np.ndarray]] = []
        used = dict.fromkeys(lengths, 0)
        for example in examples[start : start + window]:
            seqs = _sequences(example, lengths)
            # seqio measures a sequence by its non-zero ids (it reads them from a padded batch)
            seqs = {k: s[: np.count_nonzero(s)] for k, s in seqs.items()}
            if any(used[k] + len(seqs[k]) > lengths[k] for k in lengths):
                rows.append(_write_row(parts, lengths))
                parts, used = [], dict.fromkeys(lengths, 0)
            parts.append(seqs)
            used = {k: used[k] + len(seqs[k]) for k in lengths}
        rows.append(_write_row(parts, lengths))
    return rows


def pad_rows(examples: Iterable[Example], lengths: Mapping[str, int]) -> list[Row]:
    """One row per example, trimmed and padded to `lengths` (the converter with pack=False)."""
    out = []
    for example in examples:
        seqs = _sequences(example, {**lengths, _OBJECTIVES: lengths["targets"]})
        padded = {}
        for k, s in seqs.items():
            length = lengths["targets" if k == _OBJECTIVES else k]
            padded[k] = np.pad(s, (0, length - len(s)))
        out.append(_model_features(padded, packed=False))
    return out


def batch_rows(
    rows: Sequence[Row], batch_size: int, *, drop_remainder: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive rows stacked into [batch_size, length] batches (tf.data's batch)."""
    stop = len(rows) - len(rows) % batch_size if drop_remainder else len(rows)
    for i in range(0, stop, batch_size):
        chunk = rows[i : i + batch_size]
        yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}


def build_batches(
    examples: Iterable[Example],
    lengths: Mapping[str, int],
    batch_size: int,
    *,
    pack: bool = True,
    drop_remainder: bool = True,
) -> list[dict[str, np.ndarray]]:
    """The batches `get_dataset` (unshuffled, one epoch) makes of these examples in this order."""
    rows = pack_rows(examples, lengths) if pack else pad_rows(examples, lengths)
    return list(batch_rows(rows, batch_size, drop_remainder=drop_remainder))
