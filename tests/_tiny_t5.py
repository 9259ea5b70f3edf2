"""Tiny T5 1.1 configs and models (distill_sbs.models) and a packed two-objective batch."""

from __future__ import annotations

import numpy as np

from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import T5Config


def tiny_config(**overrides) -> T5Config:
    """A one-layer T5 1.1 with 16-wide embeddings (vocabulary 256, e.g. the arith SentencePiece);
    `overrides` replace fields where a test needs another shape."""
    fields = dict(
        vocab_size=256,
        emb_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
    )
    return T5Config(**{**fields, **overrides})


# Two layers and dropout, for the trainer and mesh checks.
TINY = tiny_config(
    vocab_size=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1
)


def tiny_model_and_batch(seed: int = 0, batch: int = 8, inp: int = 12, tgt: int = 10):
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, TINY.vocab_size, size=(batch, tgt)).astype(np.int32)
    lengths = rng.integers(2, tgt + 1, size=batch)
    weights = (np.arange(tgt)[None] < lengths[:, None]).astype(np.float32)
    targets = np.where(weights > 0, targets, 0).astype(np.int32)
    targets[np.arange(batch), lengths - 1] = 1  # EOS
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    enc = rng.integers(2, TINY.vocab_size, size=(batch, inp)).astype(np.int32)
    enc[:, -2:] = 0
    obj = np.broadcast_to((np.arange(batch) % 2)[:, None], (batch, tgt)).astype(np.int32)
    return EncoderDecoderModel(TINY), {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
        "decoder_objective_ids": np.ascontiguousarray(obj),
    }


# `python -m distill_sbs.train` flags of a 1-layer, 16-wide arith_dss run checkpointing every 4
# steps (TRAIN_STEPS left to the test): the subprocess runs of the resume and fault tests.
TRAIN_FLAGS = [
    "--gin_file=runs/train.gin",
    "--gin.MIXTURE_OR_TASK_NAME='arith_dss'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 80}",
    "--gin.BATCH_SIZE=8",
    "--gin.CHECKPOINT_PERIOD=4",
    "--gin.LOG_PERIOD=1",
    "--gin.DROPOUT_RATE=0.1",
    "--gin.OPTIMIZER='adamw'",
    "--gin.train.eval_at_end=False",
    "--gin.EVAL_PERIOD=0",
    "--gin.T5Config.vocab_size=256",
    "--gin.T5Config.emb_dim=16",
    "--gin.T5Config.num_heads=2",
    "--gin.T5Config.head_dim=8",
    "--gin.T5Config.mlp_dim=32",
    "--gin.T5Config.num_encoder_layers=1",
    "--gin.T5Config.num_decoder_layers=1",
]
