"""T5 encoder-decoder in Flax: T5 1.0, T5 1.1 and Flan-T5, with logical axis names.

`T5Config` is the one description of a network's shape; it is stored as JSON beside every native
checkpoint (see checkpoints.py) so that a checkpoint directory is self-describing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from distill_sbs.errors import UserError

PAD_ID = 0  # also the decoder start token, as in T5
EOS_ID = 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape and variant of a T5 network.

    T5 1.0: mlp_activations=("relu",), logits_via_embedding=True (tied input/output embeddings,
    decoder output scaled by 1/sqrt(emb_dim) before the tied projection).
    T5 1.1 / Flan-T5: mlp_activations=("gelu", "linear") (gated GELU), logits_via_embedding=False.
    """

    vocab_size: int = 32128
    emb_dim: int = 512  # d_model
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    head_dim: int = 64  # d_kv
    mlp_dim: int = 1024  # d_ff
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    logits_via_embedding: bool = False
    dropout_rate: float = 0.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # Activation dtype ("float32" or "bfloat16"); parameters always stay float32.
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_activations"] = list(self.mlp_activations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> T5Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"T5Config: unknown field(s) {unknown}; known fields are {sorted(names)}"
            )
        d = dict(d)
        if "mlp_activations" in d:
            d["mlp_activations"] = tuple(d["mlp_activations"])
        return cls(**d)


@flax.struct.dataclass
class Packing:
    """Where packed rows' examples start and end: segment ids (1, 2, ... per example, 0 on padding)
    and positions (restarting at 0 in each example), int [batch, length], as seqio's packing
    feature converter writes them. Unpacked batches pass `None` instead."""

    encoder_segment_ids: jax.Array
    decoder_segment_ids: jax.Array
    encoder_positions: jax.Array
    decoder_positions: jax.Array

    @classmethod
    def from_features(cls, features: Mapping[str, Any]) -> Packing | None:
        """The packing features of a feature-converted batch, or None when it is not packed."""
        if "encoder_segment_ids" not in features:
            return None
        return cls(**{f.name: features[f.name] for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------------------------
# Flax modules. Parameter names follow T5X (token_embedder/embedding, encoder/layers_0/attention/
# query/kernel, mlp/wi_0/kernel, relpos_bias/rel_embedding, decoder/logits_dense/kernel, ...), and
# every parameter carries logical axis names through `nn.with_logical_partitioning`.
# --------------------------------------------------------------------------------------------

_NEG_INF = -1e10  # additive mask value; finite so that fully masked rows give no NaN


def _dtype(config: T5Config) -> jnp.dtype:
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"T5Config.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
    return jnp.dtype(config.dtype)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    # "gelu" is the tanh approximation, as in T5X and HF's "gelu_new" (T5 1.1 / Flan-T5).
    table: dict[str, Callable[[jax.Array], jax.Array]] = {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu,
        "linear": lambda x: x,
    }
    if name not in table:
        raise ValueError(
            f"T5Config.mlp_activations: unknown activation {name!r}; known {sorted(table)}"
        )
    return table[name]


def _param(module: nn.Module, name: str, init, shape, axes: tuple[str, ...]) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Kernel(nn.Module):
    """A bare float32 weight named `kernel` (so paths read like T5X's .../query/kernel)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    stddev: float

    @nn.compact
    def __call__(self) -> jax.Array:
        return _param(
            self, "kernel", nn.initializers.normal(stddev=self.stddev), self.shape, self.axes
        )


def _constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


_MASK_BITS = 16  # bits per dropout draw: the rate is exact to 2**-16


def dropout_keep_threshold(rate: float) -> int:
    """Draws (uniform 16-bit integers) below this are kept: round((1 - rate) * 2**16)."""
    return min(max(round((1.0 - rate) * 2**_MASK_BITS), 1), 2**_MASK_BITS - 1)


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """bool `shape`: True where kept, independently per position, with probability
    dropout_keep_threshold(rate) / 2**16.

    Why not jax.random.bernoulli: it spends one threefry call (and, with partitionable threefry,
    half of its output) and a float conversion per position, about a quarter of a T5 small train
    step on CPU. Here each threefry2x32 call yields 64 random bits, i.e. four 16-bit draws.
    """
    n = int(np.prod(shape))
    threshold = jnp.uint16(dropout_keep_threshold(rate))
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            # another generator (e.g. rbg on TPU): its own bits, two draws per 32-bit word
            bits = jax.random.bits(key, (-(-n // 2),), jnp.uint32)
            draws = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:n]
            return (draws < threshold).reshape(shape)
        key = jax.random.key_data(key)
    calls = -(-n // 4)  # each call: two 32-bit words = four 16-bit draws
    counter = jnp.arange(calls, dtype=jnp.uint32)
    words = threefry_2x32(key, jnp.concatenate([counter, jnp.zeros_like(counter)]))
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
    return (draws < threshold).reshape(shape)


class Dropout(nn.Module):
    """Inverted dropout (flax.linen.Dropout's interface and semantics): each position is zeroed
    independently with probability `rate`, kept ones are scaled by 1 / keep probability, so the
    expectation is unchanged. The keep probability is quantised to 2**-16 (see
    dropout_keep_mask) and the scale is its exact inverse."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        keep = self.make_rng("dropout")
        mask = dropout_keep_mask(keep, x.shape, self.rate)
        scale = 2**_MASK_BITS / dropout_keep_threshold(self.rate)
        return jnp.where(mask, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.config.layer_norm_epsilon)
        return (y * scale).astype(_dtype(self.config))


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucketing of (key position - query position), as in Mesh TensorFlow and HF."""
    ret = jnp.zeros_like(relative_position)
    n = relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = -jnp.minimum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 log as in the reference; max(n, 1) avoids log(0) in the branch that is not taken.
    nf = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(nf / max_exact) / np.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return ret + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """Bias [batch or 1, heads, q, k] from per-bucket scalars; shared by the layers of a stack."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        # q_pos [b, q], k_pos [b, k] (b may be 1)
        cfg = self.config
        table = _param(
            self,
            "rel_embedding",
            nn.initializers.normal(stddev=1.0),
            (cfg.num_heads, cfg.relative_attention_num_buckets),
            ("heads", "relpos_buckets"),
        )
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # [b, q, k]
        buckets = relative_position_bucket(
            rel,
            self.bidirectional,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        # a gather from the small table: a one-hot [b, q, k, buckets] would cost far more memory
        # for packed training batches; result [b, heads, q, k]
        return jnp.take(table, buckets, axis=1).transpose(1, 0, 2, 3)


# How attention is computed. "einsum": the reference (scores, softmax, weighted values as three
# XLA ops; the activations kept for the backward pass include the [b, h, q, k] weights).
# "xla" and "cudnn": `jax.nn.dot_product_attention` with that implementation; "cudnn" is cuDNN's
# fused flash attention (NVIDIA GPUs, bfloat16 activations, head_dim a multiple of 8 up to 128, or
# 256 from Hopper on, even lengths when training), which keeps no [b, h, q, k] tensor for the
# backward pass. Neither fused path has dropout on the attention weights.
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


@gin.configurable(module="distill_sbs.network")
def attention_impl(impl: str = "einsum") -> str:
    """The attention implementation (gin: `attention_impl.impl = 'cudnn'`); checked by
    `attention_impl_of`. Not a T5Config field: checkpoints store T5Config, and the same weights
    serve under any implementation."""
    return impl


def attention_impl_of(config: T5Config) -> str:
    """The configured implementation for `config`, a one-line UserError where it cannot run."""
    impl = attention_impl()
    if impl not in ATTENTION_IMPLS:
        raise UserError(f"attention_impl.impl: unknown {impl!r}; known {list(ATTENTION_IMPLS)}")
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise UserError(
            f"attention_impl.impl = 'cudnn' needs an NVIDIA GPU (jax's backend here is "
            f"{jax.default_backend()!r}); use 'xla' or 'einsum'"
        )
    if impl == "cudnn" and config.dtype != "bfloat16":
        raise UserError(
            f"attention_impl.impl = 'cudnn' needs T5Config.dtype = 'bfloat16' (cuDNN's fused "
            f"attention takes 16-bit inputs), got {config.dtype!r}"
        )
    return impl


@flax.struct.dataclass
class ScoresBias:
    """What an attention adds to its scores, built once per stack and shared by its layers.

    bias: float32 [b or 1, heads, q, k], T5's relative position bias (None: cross-attention);
    on the einsum path the masks are folded into it (-1e10 where masked), as one tensor.
    mask: bool [b or 1, 1, q or 1, k], True where a query may see a key (None: everywhere).
    causal: a query sees no later key either (the fused paths build that mask themselves).
    """

    bias: jax.Array | None
    mask: jax.Array | None
    causal: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def build(
        cls, config: T5Config, bias: jax.Array | None, mask: jax.Array, causal: bool = False
    ) -> ScoresBias:
        """The einsum path's one additive bias, or the fused paths' bias, mask and causal flag."""
        if attention_impl_of(config) != "einsum":
            return cls(bias, mask, causal)
        return cls(cls(bias, mask, causal).einsum_bias(), None)

    def einsum_bias(self) -> jax.Array:
        """Bias and masks as one float32 tensor for the einsum path."""
        if self.mask is None and not self.causal:
            assert self.bias is not None
            return self.bias
        mask = self.mask
        if self.causal:
            assert self.bias is not None  # causal is self-attention: it has a position bias
            q, k = self.bias.shape[-2:]
            tril = jnp.tril(jnp.ones((q, k), dtype=bool))[None, None]
            mask = tril if mask is None else tril & mask
        masked = _mask_to_bias(mask)
        return masked if self.bias is None else self.bias + masked


def _fused_attention(
    impl: str, q: jax.Array, key: jax.Array, value: jax.Array, scores_bias: ScoresBias
) -> jax.Array:
    """jax.nn.dot_product_attention on [b, length, h, d] inputs; cuDNN's refusals (shapes,
    versions, no cuDNN) as a one-line UserError."""
    bias = scores_bias.bias
    if bias is not None and impl == "cudnn":
        bias = bias.astype(q.dtype)  # cuDNN adds a bias of the inputs' dtype
    try:
        return jax.nn.dot_product_attention(
            q,
            key,
            value,
            bias=bias,
            mask=scores_bias.mask,
            scale=1.0,  # T5 folds 1/sqrt(d) into the query's initialisation
            is_causal=scores_bias.causal,
            implementation=impl,
        )
    except (NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"attention_impl.impl = {impl!r}: {first}") from e


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d) scaling (folded into the query init, as in T5).

    In decode mode the keys/values are cached in the `cache` collection: self-attention writes
    the current step at `cache_index`; cross-attention projects the encoder output once, when the
    cache is created, and reads it back afterwards.
    """

    config: T5Config
    cross: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv_input: jax.Array | None,
        scores_bias: ScoresBias,
        *,
        deterministic: bool,
        decode: bool = False,
        cache_index: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        dtype = _dtype(cfg)
        h, d, e = cfg.num_heads, cfg.head_dim, cfg.emb_dim

        def proj(name: str, inp: jax.Array, std: float) -> jax.Array:
            k = Kernel((e, h, d), ("embed", "heads", "kv"), std, name=name)()
            y = jnp.einsum("ble,ehd->blhd", inp.astype(dtype), k.astype(dtype))
            return _constrain(y, ("batch", "length", "heads", "kv"))

        q = proj("query", x, (e * d) ** -0.5)
        # Keys/values are [batch, heads, length, kv] in the cache (the layout the attention
        # products read without a transpose), [batch, length, heads, kv] otherwise.
        kv_spec = "bkhd"
        if self.cross and decode and self.has_variable("cache", "cached_key"):
            key = self.get_variable("cache", "cached_key")
            value = self.get_variable("cache", "cached_value")
            kv_spec = "bhkd"
        else:
            src = x if kv_input is None else kv_input
            key = proj("key", src, e**-0.5)
            value = proj("value", src, e**-0.5)
            if decode and self.cross:
                self.put_variable("cache", "cached_key", key.transpose(0, 2, 1, 3))
                self.put_variable("cache", "cached_value", value.transpose(0, 2, 1, 3))
            elif decode:
                initialized = self.has_variable("cache", "cached_key")
                shape = (key.shape[0], h, key.shape[1], d)
                ck = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
                cv = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
                if initialized:
                    if cache_index is None:
                        raise ValueError("decode step needs cache_index")
                    zero = jnp.zeros((), jnp.int32)
                    start = (zero, zero, cache_index.astype(jnp.int32), zero)
                    ck.value = jax.lax.dynamic_update_slice(
                        ck.value, key.transpose(0, 2, 1, 3), start
                    )
                    cv.value = jax.lax.dynamic_update_slice(
                        cv.value, value.transpose(0, 2, 1, 3), start
                    )
                    key, value = ck.value, cv.value
                    kv_spec = "bhkd"

        impl = attention_impl_of(cfg)
        if impl == "einsum" or kv_spec == "bhkd":
            # the reference; also the cached decode step, whatever the implementation: one query
            # keeps no activations to save, and the cache's [b, h, k, d] layout is what these
            # products read without a transpose (the fused kernels take [b, k, h, d])
            bias = scores_bias.einsum_bias()
            scores = jnp.einsum(f"bqhd,{kv_spec}->bhqk", q, key).astype(jnp.float32) + bias
            weights = jax.nn.softmax(scores, axis=-1)
            weights = Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
            out = jnp.einsum(f"bhqk,{kv_spec}->bqhd", weights.astype(dtype), value)
        else:
            if cfg.dropout_rate > 0 and not deterministic:
                raise UserError(
                    f"attention_impl.impl = {impl!r} has no dropout on the attention weights: "
                    f"train it with T5Config.dropout_rate = 0, or use 'einsum'"
                )
            out = _fused_attention(impl, q, key, value, scores_bias)
        wo = Kernel((h, d, e), ("heads", "kv", "embed"), (h * d) ** -0.5, name="out")()
        y = jnp.einsum("bqhd,hde->bqe", out, wo.astype(dtype))
        return _constrain(y, ("batch", "length", "embed"))


class MlpBlock(nn.Module):
    """ReLU MLP (T5 1.0: wi, wo) or gated (T5 1.1: act(wi_0 x) * wi_1 x, then wo)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        cfg = self.config
        dtype = _dtype(cfg)
        acts = cfg.mlp_activations
        hidden = None
        for i, act in enumerate(acts):
            name = "wi" if len(acts) == 1 else f"wi_{i}"
            w = Kernel((cfg.emb_dim, cfg.mlp_dim), ("embed", "mlp"), cfg.emb_dim**-0.5, name=name)()
            y = _activation(act)(jnp.einsum("ble,em->blm", x.astype(dtype), w.astype(dtype)))
            hidden = y if hidden is None else hidden * y
        hidden = _constrain(hidden, ("batch", "length", "mlp"))
        hidden = Dropout(cfg.dropout_rate)(hidden, deterministic=deterministic)
        wo = Kernel((cfg.mlp_dim, cfg.emb_dim), ("mlp", "embed"), cfg.mlp_dim**-0.5, name="wo")()
        y = jnp.einsum("blm,me->ble", hidden, wo.astype(dtype))
        return _constrain(y, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, bias: ScoresBias, deterministic: bool) -> jax.Array:
        cfg = self.config
        drop = Dropout(cfg.dropout_rate)
        y = RMSNorm(cfg, name="pre_attention_layer_norm")(x)
        y = Attention(cfg, name="attention")(y, None, bias, deterministic=deterministic)
        x = x + drop(y, deterministic=deterministic)
        y = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
        y = MlpBlock(cfg, name="mlp")(y, deterministic=deterministic)
        x = x + drop(y, deterministic=deterministic)
        return _constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        self_bias: ScoresBias,
        cross_bias: ScoresBias,
        deterministic: bool,
        decode: bool,
        cache_index: jax.Array | None,
    ) -> jax.Array:
        cfg = self.config
        drop = Dropout(cfg.dropout_rate)
        y = RMSNorm(cfg, name="pre_self_attention_layer_norm")(x)
        y = Attention(cfg, name="self_attention")(
            y, None, self_bias, deterministic=deterministic, decode=decode, cache_index=cache_index
        )
        x = x + drop(y, deterministic=deterministic)
        y = RMSNorm(cfg, name="pre_cross_attention_layer_norm")(x)
        y = Attention(cfg, cross=True, name="encoder_decoder_attention")(
            y, encoded, cross_bias, deterministic=deterministic, decode=decode
        )
        x = x + drop(y, deterministic=deterministic)
        y = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
        y = MlpBlock(cfg, name="mlp")(y, deterministic=deterministic)
        x = x + drop(y, deterministic=deterministic)
        return _constrain(x, ("batch", "length", "embed"))


def _mask_to_bias(mask: jax.Array) -> jax.Array:
    return jnp.where(mask, 0.0, _NEG_INF).astype(jnp.float32)


def _positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
    if positions is not None:
        return positions.astype(jnp.int32)
    return jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]


# Rematerialisation (T5X / MaxText): what each layer keeps for the backward pass; the rest is
# recomputed there. "none" keeps everything (today's step); "minimal" keeps the projections and
# MLP matmuls (outputs without batch dimensions), recomputing attention scores and elementwise
# work; "dots_saveable" keeps every matmul; "full" keeps only each layer's input.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@gin.configurable(module="distill_sbs.network")
def remat_policy(policy: str = "none") -> str:
    """The layers' rematerialisation policy (gin: `remat_policy.policy = 'full'`)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy.policy: unknown {policy!r}; known {sorted(REMAT_POLICIES)}")
    return policy


def _layer_class(cls: type[nn.Module], training_path: bool) -> type[nn.Module]:
    """`cls`, wrapped in nn.remat under the configured policy on the training path (the cached
    decode path mutates its cache and is never differentiated). The wrapped layer takes every
    argument positionally, its trailing flags static."""
    policy = remat_policy()
    if policy == "none" or not training_path:
        return cls
    # flax counts `self` as argument 0: the encoder layer's deterministic, the decoder layer's
    # deterministic, decode and cache_index
    static = (3,) if cls is EncoderLayer else (5, 6, 7)
    return nn.remat(cls, policy=REMAT_POLICIES[policy], static_argnums=static)


class Encoder(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(
        self,
        embedded: jax.Array,
        tokens: jax.Array,
        packing: Packing | None,
        *,
        deterministic: bool,
    ) -> jax.Array:
        cfg = self.config
        pos = _positions(tokens, None if packing is None else packing.encoder_positions)
        relpos = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(pos, pos)
        mask = (tokens > 0)[:, None, None, :]
        if packing is not None:
            seg = packing.encoder_segment_ids
            mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
        bias = ScoresBias.build(cfg, relpos, mask)
        x = Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
        layer = _layer_class(EncoderLayer, training_path=True)
        for i in range(cfg.num_encoder_layers):
            x = layer(cfg, name=f"layers_{i}")(x, bias, deterministic)
        x = RMSNorm(cfg, name="encoder_norm")(x)
        return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(
        self,
        embedded: jax.Array,
        encoded: jax.Array,
        encoder_tokens: jax.Array,
        decoder_tokens: jax.Array,
        packing: Packing | None,
        *,
        deterministic: bool,
        decode: bool,
        cache_index: jax.Array | None,
        max_decode_length: int | None,
    ) -> jax.Array:
        cfg = self.config
        relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
        if decode and cache_index is not None:
            # one new token at position cache_index against the cache's max_decode_length slots
            k_pos = jnp.arange(max_decode_length, dtype=jnp.int32)[None, :]
            q_pos = jnp.reshape(cache_index, (1, 1)).astype(jnp.int32)
            # (the cached step is always the einsum path's: see Attention)
            step_mask = k_pos[:, None, None, :] <= cache_index
            self_bias = ScoresBias(relpos(q_pos, k_pos) + _mask_to_bias(step_mask), None)
        else:
            pos = _positions(decoder_tokens, None if packing is None else packing.decoder_positions)
            seg_mask = None
            if packing is not None:
                seg = packing.decoder_segment_ids
                seg_mask = seg[:, None, :, None] == seg[:, None, None, :]
            self_bias = ScoresBias.build(cfg, relpos(pos, pos), seg_mask, causal=True)
        cross_mask = (encoder_tokens > 0)[:, None, None, :]
        if packing is not None:
            dec_seg, enc_seg = packing.decoder_segment_ids, packing.encoder_segment_ids
            cross_mask = cross_mask & (dec_seg[:, None, :, None] == enc_seg[:, None, None, :])
        cross_bias = ScoresBias.build(cfg, None, cross_mask)
        x = Dropout(cfg.dropout_rate)(embedded, deterministic=deterministic)
        layer = _layer_class(DecoderLayer, training_path=not decode)
        for i in range(cfg.num_decoder_layers):
            x = layer(cfg, name=f"layers_{i}")(
                x, encoded, self_bias, cross_bias, deterministic, decode, cache_index
            )
        x = RMSNorm(cfg, name="decoder_norm")(x)
        return Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Transformer(nn.Module):
    """The T5 encoder-decoder. `__call__` gives float32 logits [batch, length, vocab]."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = nn.Embed(
            cfg.vocab_size,
            cfg.emb_dim,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")
            ),
            param_dtype=jnp.float32,
            dtype=_dtype(cfg),
            name="token_embedder",
        )
        self.encoder = Encoder(cfg, name="encoder")
        self.decoder = Decoder(cfg, name="decoder")
        if not cfg.logits_via_embedding:
            self.logits_dense = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.emb_dim**-0.5), ("embed", "vocab")
                ),
                dtype=_dtype(cfg),
                param_dtype=jnp.float32,
                name="logits_dense",
            )

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = self.token_embedder(tokens.astype(jnp.int32))
        return _constrain(x, ("batch", "length", "embed"))

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        packing: Packing | None = None,
        *,
        enable_dropout: bool = False,
    ) -> jax.Array:
        return self.encoder(
            self._embed(encoder_input_tokens),
            encoder_input_tokens,
            packing,
            deterministic=not enable_dropout,
        )

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        packing: Packing | None = None,
        *,
        enable_dropout: bool = False,
        decode: bool = False,
        cache_index: jax.Array | None = None,
        max_decode_length: int | None = None,
    ) -> jax.Array:
        """Decoder logits, float32 [batch, length, vocab].

        decode=True without cache_index creates the cache (self-attention slots for the length of
        `decoder_input_tokens`, cross-attention keys/values of `encoded`); decode=True with
        cache_index runs one step for a [batch, 1] token at that position.
        """
        cfg = self.config
        x = self.decoder(
            self._embed(decoder_input_tokens),
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            packing,
            deterministic=not enable_dropout,
            decode=decode,
            cache_index=cache_index,
            max_decode_length=max_decode_length,
        )
        if cfg.logits_via_embedding:
            # T5 1.0: tied embedding, scaled by 1/sqrt(d_model) before the projection
            x = x * (cfg.emb_dim**-0.5)
            logits = self.token_embedder.attend(x)
        else:
            logits = self.logits_dense(x)
        return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        packing: Packing | None = None,
        *,
        enable_dropout: bool = False,
    ) -> jax.Array:
        encoded = self.encode(encoder_input_tokens, packing, enable_dropout=enable_dropout)
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            packing,
            enable_dropout=enable_dropout,
        )
