"""The public model API: `EncoderDecoderModel` (init, logits, loss, generate, text helpers), `load`.

model, params = distill_sbs.load(path)   # native checkpoint, MODEL_DIR, step dir or HF T5 folder
logits = model.logits(params, encoder_input_tokens, decoder_input_tokens)   # f32 [b, l, vocab]
loss, metrics = model.loss_fn(params, batch, dropout_rng, ObjectiveLoss(weights))  # training loss
ids = model.generate(params, encoder_input_tokens, max_decode_length=32, method="beam")

`EncoderDecoderModel` satisfies `trainer.TrainableModel`: the trainer sees only init_params,
params_logical_axes and loss_fn; the batch's feature names are read here and in losses.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_sbs import decoding, storage
from distill_sbs.losses import ObjectiveLoss
from distill_sbs.network import EOS_ID, PAD_ID, Packing, T5Config, Transformer

if TYPE_CHECKING:  # seqio pulls in TensorFlow; import it only when a vocabulary is built
    import seqio

_METHODS = ("greedy", "sample", "beam")


class EncoderDecoderModel:
    """A T5 network plus its vocabulary; functions of explicit `params` (the inner params dict)."""

    def __init__(self, config: T5Config, vocabulary: seqio.Vocabulary | None = None) -> None:
        self.config = config
        self.vocabulary = vocabulary
        self.module = Transformer(config)
        self._generate_jit = jax.jit(
            self._generate_impl,
            static_argnames=(
                "max_decode_length",
                "method",
                "top_k",
                "num_beams",
                "use_top_p",
                "logprobs_top_k",
                "step_callback",
            ),  # fmt: skip
        )

    # ---------------------------------------------------------------- parameters

    def _init_boxed(self, rng: jax.Array, input_length: int, target_length: int) -> Any:
        enc = jnp.ones((1, input_length), jnp.int32)
        dec = jnp.ones((1, target_length), jnp.int32)
        return self.module.init({"params": rng}, enc, dec)["params"]

    def init_params(self, rng: jax.Array, input_length: int = 8, target_length: int = 8) -> Any:
        """Random float32 parameters (plain arrays, no partitioning boxes)."""
        return nn.meta.unbox(self._init_boxed(rng, input_length, target_length))

    def params_logical_axes(self) -> Any:
        """Tree like params whose leaves are PartitionSpecs of logical axis names."""
        abstract = jax.eval_shape(lambda r: self._init_boxed(r, 8, 8), jax.random.PRNGKey(0))
        return nn.get_partition_spec(abstract)

    # ---------------------------------------------------------------- forward

    def logits(
        self,
        params: Any,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        *,
        packing: Packing | None = None,
        enable_dropout: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """float32 logits [batch, target_length, vocab] (teacher forcing).

        packing: segment ids and positions of packed rows (network.Packing); None if unpacked.
        """
        if enable_dropout and dropout_rng is None:
            raise ValueError("logits(enable_dropout=True) needs dropout_rng")
        rngs = {"dropout": dropout_rng} if enable_dropout else {}
        return self.module.apply(
            {"params": params},
            encoder_input_tokens,
            decoder_input_tokens,
            packing,
            enable_dropout=enable_dropout,
            rngs=rngs,
        )

    def loss_fn(
        self,
        params: Any,
        batch: Mapping[str, jax.Array],
        dropout_rng: jax.Array | None,
        loss: ObjectiveLoss,
        token_counts: jax.Array | None = None,
        teacher: Any = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metric sums) of a feature-converted batch; dropout iff dropout_rng given.

        loss: objective weights, label smoothing, z-loss. token_counts: [K] denominators; the
        trainer passes the full batch's when `batch` is one microbatch of it (exact accumulation).
        teacher: the teacher's distributions on these target tokens when the loss distills.
        """
        logits = self.logits(
            params,
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            packing=Packing.from_features(batch),
            enable_dropout=dropout_rng is not None,
            dropout_rng=dropout_rng,
        )
        return loss(logits, batch, token_counts, teacher)

    # ---------------------------------------------------------------- decoding

    def generate(
        self,
        params: Any,
        encoder_input_tokens: jax.Array | np.ndarray,
        *,
        max_decode_length: int,
        method: str = "greedy",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_beams: int = 4,
        length_penalty: float = 1.0,
        rng: jax.Array | None = None,
        logprobs_top_k: int | None = None,
        step_callback: decoding.StepCallback | None = None,
    ) -> Any:
        """Token ids int32 [batch, max_decode_length]: EOS included, 0 after it.

        greedy/sample only: logprobs_top_k (not None) returns (ids, token_logprobs, top_ids,
        top_logprobs) and step_callback streams each step to the host (decoding.sample_decode);
        a callback is part of the compiled program's key, so pass the same callable each time.

        method: "greedy"; "sample" (temperature, top_k > 0 keeps the k best, top_p < 1 keeps
        the nucleus; temperature 0 is greedy); "beam" (num_beams, length_penalty; see
        decoding.beam_search for the exact semantics, those of HF generate). Compiled once per
        input shape and method, then cached.
        """
        if method not in _METHODS:
            raise ValueError(f"generate: method must be one of {_METHODS}, got {method!r}")
        if method == "sample" and temperature == 0.0:
            method = "greedy"
        if method == "sample" and rng is None:
            raise ValueError("generate(method='sample') needs rng")
        if rng is None:
            rng = jax.random.PRNGKey(0)
        tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"encoder_input_tokens must be [batch, length], got {tokens.shape}")
        return self._generate_jit(
            params,
            tokens,
            rng,
            jnp.float32(temperature),
            jnp.float32(top_p),
            jnp.float32(length_penalty),
            max_decode_length=int(max_decode_length),
            method=method,
            top_k=int(top_k) if method == "sample" else 0,
            num_beams=int(num_beams) if method == "beam" else 1,
            use_top_p=method == "sample" and top_p < 1.0,
            logprobs_top_k=logprobs_top_k,
            step_callback=step_callback,
        )

    def _generate_impl(
        self,
        params: Any,
        encoder_input_tokens: jax.Array,
        rng: jax.Array,
        temperature: jax.Array,
        top_p: jax.Array,
        length_penalty: jax.Array,
        *,
        max_decode_length: int,
        method: str,
        top_k: int,
        num_beams: int,
        use_top_p: bool,
        logprobs_top_k: int | None = None,
        step_callback: decoding.StepCallback | None = None,
    ) -> Any:
        batch = encoder_input_tokens.shape[0]
        variables = {"params": params}
        encoded = self.module.apply(variables, encoder_input_tokens, method=Transformer.encode)
        enc_tokens = encoder_input_tokens
        if num_beams > 1:
            # the encoder runs once per batch item; its output is shared by the item's beams
            encoded = jnp.repeat(encoded, num_beams, axis=0)
            enc_tokens = jnp.repeat(enc_tokens, num_beams, axis=0)
        rows = enc_tokens.shape[0]
        # Creates the cache: zero self-attention slots and the projected encoder keys/values.
        # Only the cache is used, so XLA drops the rest of this full-length decoder pass.
        _, state = self.module.apply(
            variables,
            encoded,
            enc_tokens,
            jnp.zeros((rows, max_decode_length), jnp.int32),
            decode=True,
            mutable=["cache"],
            method=Transformer.decode,
        )

        def step(tokens: jax.Array, cache: Any, index: jax.Array) -> tuple[jax.Array, Any]:
            logits, new_state = self.module.apply(
                {"params": params, "cache": cache},
                encoded,
                enc_tokens,
                tokens,
                decode=True,
                cache_index=index,
                max_decode_length=max_decode_length,
                mutable=["cache"],
                method=Transformer.decode,
            )
            return logits[:, 0], new_state["cache"]

        if method == "beam":
            return decoding.beam_search(
                step,
                state["cache"],
                batch,
                max_decode_length,
                num_beams=num_beams,
                length_penalty=length_penalty,
                reorder_cache=_reorder_self_attention_cache,
            )[0]
        return decoding.sample_decode(
            step,
            state["cache"],
            batch,
            max_decode_length,
            greedy=method == "greedy",
            rng=rng,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p if use_top_p else None,
            logprobs_top_k=logprobs_top_k,
            step_callback=step_callback,
        )

    # ---------------------------------------------------------------- text

    def _vocab(self) -> seqio.Vocabulary:
        if self.vocabulary is None:
            raise ValueError(
                "this model has no vocabulary; load it from a checkpoint that has spiece.model "
                "or pass vocabulary= to EncoderDecoderModel"
            )
        return self.vocabulary

    def encode_texts(self, texts: list[str], max_length: int) -> np.ndarray:
        """int32 [batch, max_length]: ids, truncated to leave room for EOS, EOS, then 0s."""
        vocab = self._vocab()
        out = np.full((len(texts), max_length), PAD_ID, np.int32)
        for row, text in enumerate(texts):
            ids = list(vocab.encode(text))[: max_length - 1] + [EOS_ID]
            out[row, : len(ids)] = ids
        return out

    def decode_tokens(self, ids: Any) -> list[str]:
        """Texts of id rows, each cut at its first EOS (padding dropped)."""
        vocab = self._vocab()
        texts = []
        for row in np.asarray(ids).tolist():
            if EOS_ID in row:
                row = row[: row.index(EOS_ID)]
            texts.append(vocab.decode([t for t in row if t != PAD_ID]))
        return texts


def _reorder_self_attention_cache(cache: Any, flat_indices: jax.Array) -> Any:
    """Gathers beam rows of the self-attention cache; cross-attention rows are equal per item."""

    def gather(path: tuple[Any, ...], x: jax.Array) -> jax.Array:
        names = [getattr(p, "key", None) for p in path]
        return x if "encoder_decoder_attention" in names else x[flat_indices]

    return jax.tree_util.tree_map_with_path(gather, cache)


def make_vocabulary(vocab_file: str | None, extra_ids: int = 100) -> seqio.Vocabulary | None:
    """The SentencePiece vocabulary of a checkpoint; None when it names none. A named file that
    is missing is an error (loading "no vocabulary" would fail later, or decode nonsense)."""
    if vocab_file is None:
        return None
    if not storage.exists(vocab_file):
        raise FileNotFoundError(
            f"{vocab_file}: the checkpoint's vocabulary is missing (its config.json names it); "
            "copy the SentencePiece model there"
        )
    import seqio

    # seqio opens the model with tf.io.gfile; a local copy keeps every read on our storage layer.
    return seqio.SentencePieceVocabulary(storage.local_file(vocab_file), extra_ids=extra_ids)


def is_hf_folder(path: str) -> bool:
    config = storage.join(path, "config.json")
    try:
        return storage.read_json(config).get("model_type") == "t5"
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: str) -> T5Config:
    """The T5Config of a checkpoint (native, MODEL_DIR, step dir or HF folder), no weights read."""
    if is_hf_folder(path):
        from distill_sbs import convert

        return convert.read_hf_config(path)
    from distill_sbs import checkpoints, t5x_checkpoint

    if t5x_checkpoint.is_t5x_checkpoint(path):
        return t5x_checkpoint.read_config(t5x_checkpoint.open_checkpoint(path))

    root = storage.Path(storage.resolve(path))
    described = str(root.parent) if checkpoints.is_step_dir(root) else str(root)
    return checkpoints.read_model_description(described)[0]


def load(
    path: str, *, dtype: str | None = None, abstract_params: Any = None
) -> tuple[EncoderDecoderModel, Any]:
    """(model, params) from a native checkpoint dir, MODEL_DIR, step dir, HF T5 folder or T5X
    checkpoint (t5x_checkpoint.py), local or remote (gs://...).

    dtype overrides the activation dtype ("float32" or "bfloat16"); parameters stay float32.
    abstract_params (jax.ShapeDtypeStructs with shardings) restores each parameter straight into
    its sharding instead of whole on the host: a host reads only its devices' part (orbax for
    native checkpoints, slices of HF safetensors; HF pytorch_model.bin is read whole).
    """
    from distill_sbs import t5x_checkpoint

    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if is_hf_folder(path):
        from distill_sbs import convert

        config, params, vocab_file = convert.load_hf_folder(path, abstract_params)
        extra_ids = 100
    elif t5x_checkpoint.is_t5x_checkpoint(path):
        config, params, vocab_file = t5x_checkpoint.load(path, abstract_params)
        extra_ids = 100
    else:
        from distill_sbs import checkpoints

        ckpt = checkpoints.load_native(path, abstract_params)
        config, params, vocab_file, extra_ids = (
            ckpt.config,
            ckpt.params,
            ckpt.vocab_file,
            ckpt.extra_ids,
        )
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    model = EncoderDecoderModel(config, make_vocabulary(vocab_file, extra_ids))
    return model, params
