"""Encoder-decoder feature converter that carries an objective id with every target token."""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

OBJECTIVE_FEATURE = "objective_id"  # int32 [1] (or scalar) per task example: its objective's index
_TARGET_OBJECTIVES = "targets_objective"  # the id repeated over the target tokens, packed alongside
# Saved teacher top-k (data/topk.py): example features int32 [target length, k] (encoded, never
# 0), flattened token-major for the packer; model features int32 [length * k] (seqio packs rank-1
# features only; distillation.OfflineTopK reshapes them to [length, k]).
TOPK_EXAMPLE_FEATURES = {
    "teacher_topk_ids": "decoder_topk_ids",
    "teacher_topk_logprobs": "decoder_topk_logprobs",
}
# A teacher of another tokenizer (cross_tokenizer.py): its pieces file's loss features, one int32
# [target length, width] per example, encoded alike (never 0); model feature int32 [length * width].
PIECES_EXAMPLE_FEATURE, PIECES_MODEL_FEATURE = "teacher_pieces", "decoder_pieces"
# Every per-target-token teacher feature: example name -> model name.
TOKEN_FEATURES = {**TOPK_EXAMPLE_FEATURES, PIECES_EXAMPLE_FEATURE: PIECES_MODEL_FEATURE}


class ObjectiveEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """seqio.EncDecFeatureConverter plus `decoder_objective_ids`.

    Before packing, each example's `objective_id` is broadcast over its target tokens into a
    sequence feature that seqio packs (or pads) exactly like `targets`, so after packing
    `decoder_objective_ids[i]` is the objective of `decoder_target_tokens[i]`; padding carries 0
    with loss weight 0. Examples without `objective_id` are an error.
    """

    MODEL_FEATURES = {
        **seqio.EncDecFeatureConverter.MODEL_FEATURES,
        "decoder_objective_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }

    def __call__(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        # seqio.Evaluator, left to measure lengths itself, also lists objective_id (length 1).
        lengths = {k: v for k, v in task_feature_lengths.items() if k != OBJECTIVE_FEATURE}
        # Each per-token teacher feature's width (k of a top-k, the pieces' feature width).
        self._widths = {
            n: ds.element_spec[n].shape[-1] for n in TOKEN_FEATURES if n in ds.element_spec
        }
        if self._widths:  # seqio keeps only the declared model features
            spec = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
            self.MODEL_FEATURES = {
                **type(self).MODEL_FEATURES,
                **{TOKEN_FEATURES[n]: spec for n in self._widths},
            }
        return super().__call__(ds, lengths)

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        if OBJECTIVE_FEATURE not in ds.element_spec:
            raise ValueError(
                f"the dataset has no {OBJECTIVE_FEATURE!r} feature (features: "
                f"{sorted(ds.element_spec)}); register it with distill_sbs.data.register_dataset"
            )

        def broadcast(ex):
            ids = tf.reshape(tf.cast(ex[OBJECTIVE_FEATURE], tf.int32), [-1])[0]
            # Stored as id + 1: seqio's packer measures a sequence by its non-zero entries, so
            # the ids of objective 0 would otherwise count as padding and shift the others.
            out = {
                "inputs": ex["inputs"],
                "targets": ex["targets"],
                _TARGET_OBJECTIVES: tf.fill(tf.shape(ex["targets"]), ids + 1),
            }
            for name in self._widths:  # [T, w] -> [T * w]: token-major, trimming cuts whole tokens
                out[name] = tf.reshape(ex[name], [-1])
            return out

        ds = ds.map(broadcast, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = {**task_feature_lengths, _TARGET_OBJECTIVES: task_feature_lengths["targets"]}
        lengths.update({n: task_feature_lengths["targets"] * w for n, w in self._widths.items()})
        ds = self._pack_or_pad(ds, lengths)
        return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        d = dict(super()._convert_example(features))
        d["decoder_objective_ids"] = tf.maximum(features[_TARGET_OBJECTIVES] - 1, 0)
        for name, model_name in TOKEN_FEATURES.items():
            if name in features:
                d[model_name] = features[name]
        return d

    def get_model_feature_lengths(
        self, task_feature_lengths: Mapping[str, int]
    ) -> Mapping[str, int]:
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths["decoder_objective_ids"] = task_feature_lengths["targets"]
        for name, width in getattr(self, "_widths", {}).items():
            lengths[TOKEN_FEATURES[name]] = task_feature_lengths["targets"] * width
        return lengths
