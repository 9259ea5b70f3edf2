"""data/batches.py (numpy, no TensorFlow) against the SeqIO path: the same examples give the same
batches as ObjectiveEncDecFeatureConverter, packed and padded, and the arith task's records
tokenised by SentencePiece alone give get_dataset's batches."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from distill_sbs.data import batches

LENGTHS = {"inputs": 24, "targets": 12}


def _random_examples(n: int, seed: int) -> list[dict]:
    """Lengths from 1 to the feature lengths (the converter refuses longer), ids never 0, EOS
    last."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = [rng.integers(2, 500, rng.integers(0, LENGTHS[k])) for k in ("inputs", "targets")]
        inputs, targets = (np.append(x, 1).astype(np.int32) for x in ids)
        out.append({"inputs": inputs, "targets": targets, "objective_id": int(rng.integers(3))})
    return out


def _seqio_rows(examples: list[dict], pack: bool) -> list[dict[str, np.ndarray]]:
    from distill_sbs.data import ObjectiveEncDecFeatureConverter

    def gen():
        for e in examples:
            yield {
                "inputs": e["inputs"],
                "targets": e["targets"],
                "objective_id": np.array([e["objective_id"]], np.int32),
            }

    spec = {
        "inputs": tf.TensorSpec([None], tf.int32),
        "targets": tf.TensorSpec([None], tf.int32),
        "objective_id": tf.TensorSpec([1], tf.int32),
    }
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    return list(ObjectiveEncDecFeatureConverter(pack=pack)(ds, LENGTHS).as_numpy_iterator())


def _assert_rows_equal(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert sorted(a) == sorted(b), i
        for k in b:
            assert a[k].dtype == b[k].dtype, (i, k)
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"row {i} {k}")


@pytest.mark.parametrize("pack", [True, False])
def test_rows_equal_seqio_feature_converter(pack):
    # 70 examples: three packing windows of 24 (the last one partial)
    examples = _random_examples(70, seed=pack)
    ours = batches.pack_rows(examples, LENGTHS) if pack else batches.pad_rows(examples, LENGTHS)
    theirs = _seqio_rows(examples, pack)
    _assert_rows_equal(ours, theirs)
    if pack:  # packing did pack: several sequences share rows, and rows restart per window
        assert len(ours) < 70
        assert max(int(r["decoder_segment_ids"].max()) for r in ours) >= 3


def test_window_flushes_open_row():
    """Rows never span seqio's windows of max(lengths) examples: 20 examples of 3 tokens into
    rows of 10 fill 3 + 3 + 3 + 1 per window of 10, though a fourth would fit beside that 1."""
    three = np.array([5, 6, 1], np.int32)
    examples = [{"inputs": three, "targets": three, "objective_id": 1} for _ in range(20)]
    rows = batches.pack_rows(examples, {"inputs": 10, "targets": 10})
    assert [int(r["decoder_segment_ids"].max()) for r in rows] == [3, 3, 3, 1] * 2
    assert all(set(r["decoder_objective_ids"][r["decoder_loss_weights"] > 0]) == {1} for r in rows)


def test_batch_rows_drops_remainder():
    rows = batches.pad_rows(_random_examples(7, seed=3), LENGTHS)
    out = list(batches.batch_rows(rows, 3))
    assert [b["encoder_input_tokens"].shape for b in out] == [(3, 24), (3, 24)]
    kept = list(batches.batch_rows(rows, 3, drop_remainder=False))
    assert [len(b["encoder_input_tokens"]) for b in kept] == [3, 3, 1]


@pytest.mark.parametrize("pack", [True, False])
def test_records_equal_get_dataset(pack):
    """arith's DSS label task: text examples from the records, tokenised with SentencePiece (no
    seqio), batched here == seqio's get_dataset unshuffled, one epoch."""
    import distill_sbs.tasks  # noqa: F401  (registers arith)

    from distill_sbs import data
    from distill_sbs.data import vocab

    lengths = {"inputs": 48, "targets": 16}
    text = data.build_examples("arith", "dss", 0, "train")
    encode = batches.sentencepiece_encoder(vocab.ARITH_SPM)
    examples = batches.encode_examples(text, encode, lengths)
    ours = batches.build_batches(examples, lengths, batch_size=4, pack=pack, drop_remainder=False)
    ds = data.get_dataset(
        "arith_dss_label",
        task_feature_lengths=lengths,
        split="train",
        batch_size=4,
        shuffle=False,
        pack=pack,
        repeat=False,
    )
    theirs = list(ds.as_numpy_iterator())
    assert len(ours) > 10
    _assert_rows_equal(ours, theirs)
