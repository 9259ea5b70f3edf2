"""Hugging Face T5 checkpoints <-> native parameters.

    python -m distill_sbs.convert hf-to-native --hf_dir DIR --out DIR
    python -m distill_sbs.convert native-to-hf --checkpoint DIR --out DIR
    python -m distill_sbs.convert t5x-to-native|native-to-t5x ...   (see t5x_checkpoint.py)

A HF folder is a `T5ForConditionalGeneration` directory: config.json plus model.safetensors,
pytorch_model.bin, or a sharded `*.index.json` of either (reading .bin needs torch). Restored
into shardings (`load_hf_folder(path, abstract_params)`), safetensors are read by slices: each
host reads the part of each tensor its devices hold; .bin, a pickle, is read whole. The export
writes model.safetensors + config.json (+ spiece.model), loadable by
`transformers.T5ForConditionalGeneration.from_pretrained` with no missing or unexpected keys.
An export also holds generation_config.json and, when the checkpoint has a vocabulary, the files
`AutoTokenizer.from_pretrained` reads (spiece.model, tokenizer_config.json,
special_tokens_map.json). A HF folder with only a tokenizer.json (transformers 5) gets the
packaged T5 vocabulary when its pieces are that vocabulary's, else an error.

Weight layout: HF linear weights are [out, in]; ours are T5X-style kernels [in, ...]. Attention
q/k/v [heads*d_kv, d_model] <-> [d_model, heads, d_kv]; o [d_model, heads*d_kv] <-> [heads, d_kv,
d_model]; relative_attention_bias [buckets, heads] <-> rel_embedding [heads, buckets].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags, logging

from distill_sbs import partitioning, program, storage, t5x_checkpoint
from distill_sbs.data.options import DEFAULT_T5_VOCAB
from distill_sbs.errors import UserError
from distill_sbs.network import T5Config

# HF activation name -> ours ("gelu" is the tanh approximation, HF's "gelu_new")
_HF_TO_ACT = {
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "silu": "silu",
    "swish": "silu",
}
_ACT_TO_HF = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu"}
# Keys HF writes or accepts that alias `shared.weight` or are never used.
_IGNORED_HF_KEYS = {
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
}


# What HF's generate needs beside config.json (T5: decoding starts from pad).
GENERATION_CONFIG = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}


class ConversionError(UserError):
    """A config, tensor, vocabulary or folder that does not fit; the message names it."""


# ------------------------------------------------------------------------------------ configs


def hf_config_to_t5config(hf: dict[str, Any]) -> T5Config:
    """T5Config from a HF T5 config.json dict (transformers 4.x or 5.x)."""
    if hf.get("model_type", "t5") != "t5":
        raise ConversionError(f"config.json: model_type is {hf.get('model_type')!r}, not 't5'")
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    if (gated and len(parts) != 2) or (not gated and len(parts) != 1):
        raise ConversionError(
            f"config.json: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'"
        )
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # HF's own backwards-compat rule
    if act not in _HF_TO_ACT:
        raise ConversionError(
            f"config.json: feed_forward_proj {proj!r}: activation {act!r} is not supported "
            f"(supported: {sorted(_HF_TO_ACT)})"
        )
    acts = (_HF_TO_ACT[act], "linear") if gated else (_HF_TO_ACT[act],)
    # transformers 5 always ties the embedding and records the 1/sqrt(d) output scaling of
    # T5 1.0 in scale_decoder_outputs; transformers 4 used tie_word_embeddings for both.
    tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    try:
        num_layers = int(hf["num_layers"])
        return T5Config(
            vocab_size=int(hf["vocab_size"]),
            emb_dim=int(hf["d_model"]),
            num_heads=int(hf["num_heads"]),
            num_encoder_layers=num_layers,
            num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
            head_dim=int(hf["d_kv"]),
            mlp_dim=int(hf["d_ff"]),
            mlp_activations=acts,
            logits_via_embedding=bool(tied),
            dropout_rate=float(hf.get("dropout_rate", 0.1)),
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        )
    except KeyError as e:
        raise ConversionError(f"config.json: missing field {e.args[0]!r}") from e


def t5config_to_hf_config(config: T5Config) -> dict[str, Any]:
    """A HF T5 config.json dict for `config`."""
    acts = tuple(config.mlp_activations)
    if len(acts) == 2 and acts[1] == "linear" and acts[0] in _ACT_TO_HF:
        act = _ACT_TO_HF[acts[0]]
        if act == "gelu":  # HF maps "gated-gelu" to gelu_new, so exact gated GELU has no name
            raise ConversionError(
                "T5Config.mlp_activations ('gelu_exact', 'linear') has no HF form"
            )
        proj = "gated-gelu" if act == "gelu_new" else f"gated-{act}"
    elif len(acts) == 1 and acts[0] in _ACT_TO_HF:
        act = _ACT_TO_HF[acts[0]]
        proj = act
    else:
        raise ConversionError(f"T5Config.mlp_activations {acts} has no HF T5 equivalent")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": proj,
        "dense_act_fn": act,
        "is_gated_act": len(acts) == 2,
        "tie_word_embeddings": config.logits_via_embedding,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": "float32",
    }


# ------------------------------------------------------------------------------------ weights

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one HF tensor becomes one native parameter: whole (`to_native`, `to_hf`) and by slices
    (`source`: a native index, bounds concrete, -> the HF index to read and the function that turns
    that HF block into the native block). Every map only moves values (transposes, reshapes,
    selections), so a converted slice equals the same slice of the whole conversion bit for bit."""

    native_shape: tuple[int, ...]
    to_native: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    source: Callable[[Index], tuple[Index, Callable[[np.ndarray], np.ndarray]]]


def _same(shape: tuple[int, ...]) -> _Layout:
    return _Layout(shape, lambda x: x, lambda x: x, lambda i: (i, lambda b: b))


def _transposed(shape: tuple[int, int]) -> _Layout:
    # native [a, b] = HF [b, a]: the index tuple is permuted the same way
    return _Layout(shape[::-1], lambda x: x.T, lambda x: x.T, lambda i: (i[::-1], lambda b: b.T))


def _heads(d: int, s: slice) -> slice:
    """The HF rows/columns (head-major, h*d) of native heads `s`: contiguous, so exact when
    head_dim is whole. A split of head_dim (no partitioning rule splits `kv`) cannot be read
    as one exact block: it reads the whole heads that enclose it, and the caller keeps its part."""
    return slice(s.start * d, s.stop * d)


def _qkv(e: int, h: int, d: int) -> _Layout:
    # native [e, h, d] = HF [h*d, e].T reshaped
    def source(i: Index) -> tuple[Index, Callable[[np.ndarray], np.ndarray]]:
        se, sh, sd = i
        return (_heads(d, sh), se), lambda b: b.T.reshape(b.shape[1], -1, d)[:, :, sd]

    return _Layout(
        (e, h, d), lambda x: x.T.reshape(e, h, d), lambda x: x.reshape(e, h * d).T, source
    )


def _attention_out(e: int, h: int, d: int) -> _Layout:
    # native [h, d, e] = HF [e, h*d].T reshaped
    def source(i: Index) -> tuple[Index, Callable[[np.ndarray], np.ndarray]]:
        sh, sd, se = i
        return (se, _heads(d, sh)), lambda b: b.T.reshape(-1, d, b.shape[0])[:, sd, :]

    return _Layout(
        (h, d, e), lambda x: x.T.reshape(h, d, e), lambda x: x.reshape(h * d, e).T, source
    )


# (native path, HF key, HF shape, layout)
_Entry = tuple[tuple[str, ...], str, tuple[int, ...], _Layout]


def _entries(config: T5Config) -> Iterator[_Entry]:
    e, h, d, m = config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim
    v, nb = config.vocab_size, config.relative_attention_num_buckets
    qkv, out = _qkv(e, h, d), _attention_out(e, h, d)

    yield ("token_embedder", "embedding"), "shared.weight", (v, e), _same((v, e))
    if not config.logits_via_embedding:
        yield ("logits_dense", "kernel"), "lm_head.weight", (v, e), _transposed((v, e))

    def attention(native, hf):
        for name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
            yield (*native, name, "kernel"), f"{hf}.{hf_name}.weight", (h * d, e), qkv
        yield (*native, "out", "kernel"), f"{hf}.o.weight", (e, h * d), out

    def mlp(native, hf):
        names = ["wi"] if len(config.mlp_activations) == 1 else ["wi_0", "wi_1"]
        for name in names:
            yield (*native, name, "kernel"), f"{hf}.{name}.weight", (m, e), _transposed((m, e))
        yield (*native, "wo", "kernel"), f"{hf}.wo.weight", (e, m), _transposed((e, m))

    def norm(native, hf):
        yield (*native, "scale"), f"{hf}.weight", (e,), _same((e,))

    for stack, n_layers, parts in (
        (
            "encoder",
            config.num_encoder_layers,
            [("pre_attention_layer_norm", "attention", "SelfAttention"), ("pre_mlp_layer_norm",)],
        ),
        (
            "decoder",
            config.num_decoder_layers,
            [
                ("pre_self_attention_layer_norm", "self_attention", "SelfAttention"),
                ("pre_cross_attention_layer_norm", "encoder_decoder_attention", "EncDecAttention"),
                ("pre_mlp_layer_norm",),
            ],
        ),
    ):
        yield (
            (stack, "relpos_bias", "rel_embedding"),
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (nb, h),
            _transposed((nb, h)),
        )
        for i in range(n_layers):
            for j, part in enumerate(parts):
                hf = f"{stack}.block.{i}.layer.{j}"
                native = (stack, f"layers_{i}")
                yield from norm((*native, part[0]), f"{hf}.layer_norm")
                if len(part) == 3:
                    yield from attention((*native, part[1]), f"{hf}.{part[2]}")
                else:
                    yield from mlp((*native, "mlp"), f"{hf}.DenseReluDense")
        final = "encoder_norm" if stack == "encoder" else "decoder_norm"
        yield from norm((stack, final), f"{stack}.final_layer_norm")


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            raise ConversionError(f"params: missing {'/'.join(path)}")
        tree = tree[p]
    return tree


def _float32(name: str, value: Any) -> np.ndarray:
    """`value` as float32; an integer or boolean tensor, or a NaN or infinite value, is an error
    naming the tensor (a cast would hide a wrong file, and NaN weights give NaN text)."""
    x = np.asarray(value)
    if x.dtype.kind not in "fV":  # "V": ml_dtypes' bfloat16 and float8 types
        raise ConversionError(f"{name} has dtype {x.dtype}; model weights must be floating point")
    x = x.astype(np.float32, copy=False)
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ConversionError(f"{name} has {bad} NaN or infinite values (of {x.size})")
    return x


def _plan(
    keys: Collection[str], config: T5Config, lm_head_tied: bool
) -> list[tuple[tuple[str, ...], str, tuple[int, ...], _Layout]]:
    """(native path, HF key to read, HF shape, layout) of every parameter, after checking that
    `keys` has each tensor the config needs and no other."""
    plan = []
    used = set(_IGNORED_HF_KEYS)
    for path, key, shape, layout in _entries(config):
        if key not in keys and key == "lm_head.weight" and lm_head_tied:
            # transformers 5 saves an lm_head tied to the embedding only as the embedding
            key = "shared.weight"
        if key not in keys:
            raise ConversionError(f"HF tensor {key!r} is missing (expected shape {shape})")
        used.add(key)
        plan.append((path, key, shape, layout))
    if config.logits_via_embedding:
        used.add("lm_head.weight")  # T5 1.0 checkpoints may carry the tied copy
    unexpected = sorted(set(keys) - used)
    if unexpected:
        raise ConversionError(
            f"HF tensors not used by a T5 with this config (first: {unexpected[0]!r}): "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    return plan


def _check_shape(key: str, got: Sequence[int], shape: tuple[int, ...]) -> None:
    if tuple(got) != shape:
        raise ConversionError(
            f"HF tensor {key!r} has shape {tuple(got)}, the config implies {shape}"
        )


def hf_state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    config: T5Config,
    place: Callable[[tuple[str, ...], np.ndarray], Any] | None = None,
    *,
    lm_head_tied: bool = False,
) -> dict[str, Any]:
    """Native params (nested dict of float32 numpy arrays) from a HF T5 state dict.

    `state_dict` may read lazily (one tensor per lookup); `place(path, array)` (e.g. into a device
    sharding) gets each converted parameter, so that the host holds one tensor at a time.
    lm_head_tied: the HF config ties lm_head to the embedding (its tie_word_embeddings), so a
    state dict without lm_head.weight means the embedding; otherwise lm_head.weight is required.
    """
    params: dict[str, Any] = {}
    for path, key, shape, layout in _plan(state_dict.keys(), config, lm_head_tied):
        x = _float32(f"HF tensor {key!r}", state_dict[key])
        _check_shape(key, x.shape, shape)
        y = np.ascontiguousarray(layout.to_native(x))
        _set(params, path, y if place is None else place(path, y))
    return params


def params_to_hf_state_dict(params: Any, config: T5Config) -> dict[str, np.ndarray]:
    """HF T5 state dict (float32 numpy) from native params."""
    out = {}
    for path, key, shape, layout in _entries(config):
        x = _float32(f"params {'/'.join(path)}", _get(params, path))
        y = np.ascontiguousarray(layout.to_hf(x))
        if tuple(y.shape) != shape:
            raise ConversionError(
                f"params {'/'.join(path)} has shape {tuple(x.shape)}, which does not give "
                f"HF tensor {key!r} of shape {shape} for this config"
            )
        out[key] = y
    return out


# ------------------------------------------------------------------------------------ folders


class _SafetensorsFile(Mapping):
    """The tensors of one local .safetensors file, each read (memory-mapped) when looked up."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self._path = path
        try:
            self._numpy = safe_open(path, framework="numpy")
        except Exception as e:  # noqa: BLE001 - safetensors' own error type, a truncated file
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
        self._keys = list(self._numpy.keys())
        self._key_set = set(self._keys)
        self._flax = None

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._numpy.get_tensor(key)
        except (TypeError, ValueError):
            # numpy has no bfloat16: read through jax, which has it
            from safetensors import safe_open

            if self._flax is None:
                self._flax = safe_open(self._path, framework="flax")
            return np.asarray(self._flax.get_tensor(key), dtype=np.float32)

    def __contains__(self, key: object) -> bool:  # Mapping's would read the tensor
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (nothing read)."""
        return tuple(self._numpy.get_slice(key).get_shape())

    def read_slice(self, key: str, index: Index) -> np.ndarray:
        """Only the bytes of `index` (concrete bounds, step 1) of tensor `key`, from the map."""
        import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors asks for

        return self._numpy.get_slice(key)[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _Shards(Mapping):
    """Tensors spread over several files (a HF sharded checkpoint), by name; slices read from
    safetensors shards."""

    def __init__(self, files: Sequence[Any]) -> None:
        self._where = {k: f for f in files for k in f}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def read_slice(self, key: str, index: Index) -> np.ndarray:
        return self._where[key].read_slice(key, index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{path}: reading pytorch_model.bin needs torch (pip install torch); "
            "or save the model with safetensors"
        ) from e
    try:
        state = torch.load(storage.local_file(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # pickle/zip errors of a bad file
        raise ConversionError(f"{path}: not a readable torch checkpoint ({e})") from e
    # floats as float32 (numpy has no bfloat16); other dtypes kept, for _float32 to name them
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def _open_safetensors(path: str) -> _SafetensorsFile:
    # safetensors opens only local files (memory-mapped) or whole bytes. A local file is mapped
    # where it lies, so only the tensors or slices looked up are read. A gs:// file is first
    # streamed to local disk, once per process (storage.local_file), then read by slices from
    # there: host memory holds only the slices, but each host downloads the whole file; the
    # alternative, bytes, would hold the whole file in memory. To have each host fetch only its
    # share from gs://, convert once to a native checkpoint (orbax reads by shard).
    return _SafetensorsFile(storage.local_file(path))


def read_hf_weights(path: str) -> Mapping[str, np.ndarray]:
    """The state dict of a HF folder (single or sharded safetensors, or torch .bin); safetensors
    tensors are read when looked up."""
    readers = (
        ("model.safetensors", _open_safetensors),
        ("pytorch_model.bin", _read_torch_bin),
    )
    for name, reader in readers:
        single = storage.join(path, name)
        index = single + ".index.json"
        if storage.exists(single):
            return reader(single)
        if storage.exists(index):
            try:
                weight_map = storage.read_json(index)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a HF index file ({e})") from e
            shards = sorted(set(weight_map.values()))
            return _Shards([reader(storage.join(path, shard)) for shard in shards])
    raise FileNotFoundError(
        f"{path}: no model.safetensors, pytorch_model.bin or their .index.json shards"
    )


def _read_hf_config_json(path: str) -> tuple[str, dict[str, Any]]:
    config_path = storage.join(path, "config.json")
    if not storage.exists(config_path):
        raise FileNotFoundError(f"{config_path}: not found; is {path} a HF T5 folder?")
    try:
        hf_config = storage.read_json(config_path)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if not isinstance(hf_config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    return config_path, hf_config


def read_hf_config(path: str) -> T5Config:
    """The T5Config of a HF T5ForConditionalGeneration folder."""
    config_path, hf_config = _read_hf_config_json(path)
    try:
        return hf_config_to_t5config(hf_config)
    except ConversionError as e:
        raise ConversionError(f"{config_path}: {e}") from e


@functools.cache
def _packaged_pieces() -> tuple[tuple[str, float], ...]:
    """(piece, score) by id of the packaged T5 vocabulary with its 100 extra ids, as a HF
    tokenizer.json writes them (extra ids last, <extra_id_99> first, score 0)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=DEFAULT_T5_VOCAB)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return tuple(pieces + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))])


def _check_tokenizer_json(tokenizer_file: str) -> None:
    """A tokenizer.json must hold the packaged T5 vocabulary (same pieces, ids and scores)."""
    fix = "put the tokenizer's SentencePiece model beside it as spiece.model"
    try:
        model = storage.read_json(tokenizer_file)["model"]
        kind, vocab = model["type"], model.get("vocab") or []
        pieces = tuple((str(piece), float(score)) for piece, score in vocab)
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{tokenizer_file}: not a tokenizers file ({e}); {fix}") from e
    if kind != "Unigram":
        raise ConversionError(
            f"{tokenizer_file}: a {kind} tokenizer, not a SentencePiece (Unigram) one; {fix}"
        )
    expected = _packaged_pieces()
    if len(pieces) != len(expected):
        raise ConversionError(
            f"{tokenizer_file}: {len(pieces)} pieces, the T5 vocabulary has {len(expected)} "
            f"(with 100 extra ids); {fix}"
        )
    for i, ((piece, score), (want, want_score)) in enumerate(zip(pieces, expected, strict=True)):
        if piece != want or np.float32(score) != np.float32(want_score):
            raise ConversionError(
                f"{tokenizer_file}: id {i} is {piece!r} (score {score}), the T5 vocabulary's "
                f"is {want!r} (score {want_score}); {fix}"
            )


def hf_vocabulary(path: str) -> str | None:
    """The SentencePiece model of a HF folder: its spiece.model; for a folder with a tokenizer.json
    only (transformers 5), the packaged T5 vocabulary if tokenizer.json holds exactly its pieces
    (else ConversionError); None when the folder has neither file."""
    spiece = storage.join(path, "spiece.model")
    if storage.exists(spiece):
        return spiece
    tokenizer_file = storage.join(path, "tokenizer.json")
    if not storage.exists(tokenizer_file):
        return None
    _check_tokenizer_json(tokenizer_file)
    return DEFAULT_T5_VOCAB


def load_hf_folder(
    path: str, abstract_params: Any = None
) -> tuple[T5Config, dict[str, Any], str | None]:
    """(config, params, vocabulary file or None) of a HF T5ForConditionalGeneration folder.

    With `abstract_params` (jax.ShapeDtypeStructs with shardings) each parameter is built in its
    sharding: from safetensors each host reads only the slices its devices hold (a gs:// file is
    first copied to local disk, see `_open_safetensors`); from pytorch_model.bin, which cannot be
    read in part, each tensor is read whole and the devices take their slices.
    """
    config = read_hf_config(path)
    # transformers 5 writes tie_word_embeddings true for every T5 (T5 1.1 too); 4.x only for T5 1.0
    tied = bool(_read_hf_config_json(path)[1].get("tie_word_embeddings", True))
    vocab = hf_vocabulary(path)  # before the weights: a wrong tokenizer fails fast
    state = read_hf_weights(path)
    try:
        if abstract_params is None:
            params = hf_state_dict_to_params(state, config, lm_head_tied=tied)
        elif hasattr(state, "read_slice"):  # safetensors: each host reads its devices' slices
            params = _restore_slices(state, config, abstract_params, lm_head_tied=tied)
        else:  # torch .bin cannot be read in part: whole tensors, then each device's slice
            params = hf_state_dict_to_params(
                state, config, _placer(abstract_params), lm_head_tied=tied
            )
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from e
    return config, params, vocab


def _block_reader(state: Any, key: str, layout: _Layout) -> Callable[[Index], np.ndarray]:
    """block(native index) -> that block of the parameter, read as the HF slice it comes from;
    devices that hold the same block (replicas) read it once."""
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def block(index: Index) -> np.ndarray:
        index = partitioning.concrete_index(index, layout.native_shape)
        bounds = tuple((s.start, s.stop) for s in index)  # slices are unhashable before 3.12
        if bounds not in blocks:
            source, finish = layout.source(index)
            x = _float32(f"HF tensor {key!r}", state.read_slice(key, source))
            blocks[bounds] = np.ascontiguousarray(finish(x))
        return blocks[bounds]

    return block


def _restore_slices(
    state: Any, config: T5Config, abstract_params: Any, *, lm_head_tied: bool
) -> dict[str, Any]:
    """Native params built in the shardings of `abstract_params` from a safetensors state (with
    `shape(key)` and `read_slice(key, index)`): each device's block is read as the HF slice its
    layout maps it to, so a host reads the bytes its addressable devices hold and no more (plus,
    where head_dim is split, the rest of those heads). Values are checked (finite, floating point)
    slice by slice: a host sees only its slices' values."""
    import jax

    params: dict[str, Any] = {}
    for path, key, shape, layout in _plan(list(state), config, lm_head_tied):
        _check_shape(key, state.shape(key), shape)
        want = _get(abstract_params, path)
        if tuple(want.shape) != layout.native_shape:
            raise ConversionError(
                f"params {'/'.join(path)}: the target has shape {tuple(want.shape)}, "
                f"HF tensor {key!r} gives {layout.native_shape}"
            )
        block = _block_reader(state, key, layout)
        sharding = getattr(want, "sharding", None)
        if sharding is None:
            value = block(tuple(slice(None) for _ in layout.native_shape))
        else:
            value = jax.make_array_from_callback(layout.native_shape, sharding, block)
        _set(params, path, value)
    return params


def _placer(abstract_params: Any) -> Callable[[tuple[str, ...], np.ndarray], Any]:
    """place(path, array) -> the array in the sharding `abstract_params` gives that path."""
    import jax

    def place(path: tuple[str, ...], x: np.ndarray) -> Any:
        want = _get(abstract_params, path)
        sharding = getattr(want, "sharding", None)
        if sharding is None:
            return x
        # Each device gets only its slice (works when the sharding spans several hosts).
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return place


def _check_apart(source: str, out_dir: str) -> None:
    """--out may not be the source folder, lie inside it or contain it: the conversion would
    overwrite its own input."""
    src, out = (storage.resolve(p).rstrip("/") for p in (source, out_dir))
    if src == out or out.startswith(src + "/") or src.startswith(out + "/"):
        raise ConversionError(
            f"--out {out_dir} overlaps the input {source}; give a directory outside it"
        )


def hf_to_native(hf_dir: str, out_dir: str) -> None:
    """Converts a HF T5 folder into a native checkpoint directory."""
    from distill_sbs import checkpoints

    _check_apart(hf_dir, out_dir)
    config, params, vocab = load_hf_folder(hf_dir)
    if vocab is None:
        logging.warning(
            "%s has no spiece.model or tokenizer.json: the checkpoint gets no vocabulary, so "
            "eval, infer, serve and text generation cannot use it (copy the SentencePiece "
            "model into %s as spiece.model to add one)",
            hf_dir,
            out_dir,
        )
    checkpoints.save_native(out_dir, params, config, vocab)


def tokenizer_files(vocab_file: str, extra_ids: int) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json, by name, with which
    `AutoTokenizer.from_pretrained` reads a folder's spiece.model as seqio does: pad, EOS and unk
    as the SentencePiece model defines them (pad is id 0 in seqio), `extra_ids` sentinels."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=storage.local_file(vocab_file))
    special = {
        "pad_token": sp.id_to_piece(0),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, **special}
    config["additional_special_tokens"] = sentinels
    special_map = {**special, "additional_special_tokens": sentinels}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def native_to_hf(checkpoint: str, out_dir: str) -> None:
    """Writes a native checkpoint (dir, MODEL_DIR or step dir) as a HF T5 folder (local or remote):
    weights, config.json, generation_config.json and, with a vocabulary, the tokenizer files.

    Everything is checked before the first write; the weights are written last: a folder whose
    model.safetensors exists is complete.
    """
    from safetensors.numpy import save

    from distill_sbs import checkpoints

    _check_apart(checkpoint, out_dir)
    ckpt = checkpoints.load_native(checkpoint)
    state = params_to_hf_state_dict(ckpt.params, ckpt.config)
    files = {
        "config.json": t5config_to_hf_config(ckpt.config),
        "generation_config.json": GENERATION_CONFIG,
    }
    if ckpt.vocab_file is not None:
        if not storage.exists(ckpt.vocab_file):
            raise ConversionError(
                f"{ckpt.vocab_file}: the checkpoint's vocabulary is missing (its config.json "
                "names it); copy the SentencePiece model there"
            )
        files.update(tokenizer_files(ckpt.vocab_file, ckpt.extra_ids))
    else:
        logging.warning("%s has no vocabulary: the export has no tokenizer files", checkpoint)
    for name, value in files.items():
        storage.write_json(storage.join(out_dir, name), value)
    if ckpt.vocab_file is not None:
        storage.copy(ckpt.vocab_file, storage.join(out_dir, "spiece.model"))
    storage.write_bytes(
        storage.join(out_dir, "model.safetensors"), save(state, metadata={"format": "pt"})
    )


# ---------------------------------------------------------------------------------- the program


def define_flags() -> None:
    """The program's flags, defined by program.run (never at import: a library user of convert
    must not find --checkpoint or --out claimed)."""
    flags.DEFINE_string("hf_dir", None, "hf-to-native: the Hugging Face T5 folder to read.")
    flags.DEFINE_string(
        "checkpoint", None, "native-to-hf/-t5x: the native checkpoint; t5x-to-native: the T5X one."
    )
    flags.DEFINE_string("out", None, "The directory to write.")


# command -> (its source flag, the conversion(source, out)); a new command is one entry here
# (and its source flag in define_flags).
COMMANDS: dict[str, tuple[str, Callable[[str, str], None]]] = {
    "hf-to-native": ("hf_dir", hf_to_native),
    "native-to-hf": ("checkpoint", native_to_hf),
    # T5X checkpoints (t5x_checkpoint.py): a T5X MODEL_DIR / step dir in, or one written
    "t5x-to-native": ("checkpoint", t5x_checkpoint.t5x_to_native),
    "native-to-t5x": ("checkpoint", t5x_checkpoint.native_to_t5x),
}


def main(args: Sequence[str]) -> None:
    """`python -m distill_sbs.convert COMMAND --SOURCE DIR --out DIR`."""
    if len(args) != 1 or args[0] not in COMMANDS:
        raise UserError(f"expected one command, {' or '.join(COMMANDS)}; got {list(args)}")
    command = args[0]
    source_flag, convert_fn = COMMANDS[command]
    FLAGS = flags.FLAGS
    for other, _ in COMMANDS.values():
        if other != source_flag and FLAGS[other].present:
            raise UserError(f"{command} reads --{source_flag}, not --{other}")
    if FLAGS[source_flag].value is None or FLAGS.out is None:
        raise UserError(f"{command} needs --{source_flag} and --out")
    try:
        convert_fn(FLAGS[source_flag].value, FLAGS.out)
    except (OSError, ImportError) as e:  # an unreadable folder; torch missing for a .bin
        raise UserError(f"{command}: {e}") from e
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    program.run(main, define_flags, arguments=True)
