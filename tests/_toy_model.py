"""A toy encoder-decoder satisfying trainer.TrainableModel (init_params, params_logical_axes,
loss_fn), for testing trainer mechanics independently of network.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


class ToyModel:
    def __init__(self, vocab: int = 32, embed: int = 8, mlp: int = 16) -> None:
        self.vocab, self.embed, self.mlp = vocab, embed, mlp

    def init_params(self, rng):
        k1, k2, k3 = jax.random.split(rng, 3)
        return {
            "token_embedder": {"embedding": jax.random.normal(k1, (self.vocab, self.embed))},
            "mlp": {"wi": jax.random.normal(k2, (self.embed, self.mlp)) * 0.3},
            "out": {"kernel": jax.random.normal(k3, (self.mlp, self.vocab)) * 0.3},
        }

    def params_logical_axes(self):
        return {
            "token_embedder": {"embedding": P("vocab", "embed")},
            "mlp": {"wi": P("embed", "mlp")},
            "out": {"kernel": P("mlp", "vocab")},
        }

    def logits(self, params, encoder_input_tokens, decoder_input_tokens, dropout_rng=None, **kw):
        emb = params["token_embedder"]["embedding"]
        ctx = jnp.mean(emb[encoder_input_tokens], axis=1, keepdims=True)
        h = emb[decoder_input_tokens] + ctx
        if dropout_rng is not None:
            h = h * jax.random.bernoulli(dropout_rng, 0.9, h.shape) / 0.9
        h = jax.nn.gelu(h @ params["mlp"]["wi"])
        return h @ params["out"]["kernel"]

    def loss_fn(self, params, batch, dropout_rng, loss, token_counts=None):
        logits = self.logits(
            params, batch["encoder_input_tokens"], batch["decoder_input_tokens"], dropout_rng
        )
        return loss(logits, batch, token_counts)


def toy_batch(seed: int = 0, batch: int = 8, inp: int = 6, tgt: int = 5, vocab: int = 32):
    import numpy as np

    rng = np.random.default_rng(seed)
    targets = rng.integers(2, vocab, size=(batch, tgt)).astype(np.int32)
    lengths = rng.integers(1, tgt + 1, size=batch)
    weights = (np.arange(tgt)[None] < lengths[:, None]).astype(np.float32)
    targets = np.where(weights > 0, targets, 0).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": rng.integers(2, vocab, size=(batch, inp)).astype(np.int32),
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
        "decoder_objective_ids": (np.arange(batch)[:, None] % 2 * np.ones((1, tgt))).astype(
            np.int32
        ),
    }
