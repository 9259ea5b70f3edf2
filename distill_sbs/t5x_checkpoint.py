"""T5X checkpoints <-> native parameters.

    python -m distill_sbs.convert t5x-to-native --checkpoint DIR --out DIR
    python -m distill_sbs.convert native-to-t5x --checkpoint DIR --out DIR

The format is the one upstream `t5x.checkpoints.Checkpointer` writes and Google's published T5 1.1
and Flan-T5 checkpoints come in (gs://t5-data/pretrained_models/t5x/...):

    MODEL_DIR/checkpoint_<step>/checkpoint     msgpack: {"version": 3, "optimizer": {"target":
                                               params, "state": {"step", "param_states"}}}
    MODEL_DIR/checkpoint_<step>/target.<a.b.c>/  one zarr array per partitioned parameter

A leaf of the msgpack tree is either the array itself (small, unpartitioned leaves) or a
tensorstore spec of a zarr array whose path is relative to the step directory. Version 0 files
(early Flax) hold {"target", "state"} at the top. Only `target` is read: optimizer state, present
or not, is ignored.

Parameter names are ours already (network.py follows T5X), except that T5X keeps the untied output
projection inside the decoder (decoder/logits_dense) and stores attention kernels flat:
query/key/value [embed, heads*kv] <-> ours [embed, heads, kv], out [heads*kv, embed] <-> ours
[heads, kv, embed]. The checkpoint gives the network's shape (widths, layers, heads, buckets, gated
MLP or not, tied or not); what it cannot say (activation, dropout, vocabulary, max distance) comes
from gin's T5Config bindings or the defaults, and a gin binding that contradicts the checkpoint is
one error. Restored into shardings, each host reads only the blocks its devices hold.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from distill_sbs import partitioning, storage
from distill_sbs.errors import UserError
from distill_sbs.network import T5Config

MSGPACK_FILE = "checkpoint"
# What T5X writes with use_orbax (its train.py's default now): checkpoint_<step>/state, an orbax
# PyTree checkpoint (OCDBT) of the same tree, one zarr array per leaf.
ORBAX_STATE = "state"
ORBAX_METADATA = "_METADATA"
STEP_PREFIX = "checkpoint"
VERSION = 3  # what upstream's Checkpointer writes
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")
_CHUNK_BYTES = 64 * 2**20  # upstream's chunk size target
# The T5 vocabulary with its 100 extra ids: a checkpoint with at least this many embedding rows
# is taken to use it (the published ones have 32128, padded for TPUs).
_T5_VOCAB_SIZE = 32100
# T5Config fields the checkpoint determines; a gin binding of one must agree with it.
SHAPE_FIELDS = (
    "vocab_size",
    "emb_dim",
    "num_heads",
    "head_dim",
    "mlp_dim",
    "num_encoder_layers",
    "num_decoder_layers",
    "logits_via_embedding",
    "relative_attention_num_buckets",
)

Path = tuple[str, ...]
Index = tuple[slice, ...]


class T5XCheckpointError(UserError):
    """A path that is not a T5X checkpoint, a missing step, or parameters that do not fit."""


# ------------------------------------------------------------------------------- locating


def _is_step_dir(path: str) -> bool:
    msgpack = storage.Path(storage.join(path, MSGPACK_FILE))
    return msgpack.is_file() or storage.exists(storage.join(path, ORBAX_STATE, ORBAX_METADATA))


def _steps(model_dir: str) -> dict[int, str]:
    steps = {}
    if not storage.Path(model_dir).is_dir():
        return steps
    for name in storage.listdir(model_dir):
        m = _STEP_DIR.match(name)
        if m and _is_step_dir(storage.join(model_dir, name)):
            steps[int(m.group(1))] = storage.join(model_dir, name)
    return steps


def is_t5x_checkpoint(path: str) -> bool:
    """Whether `path` is a T5X msgpack file, step directory or MODEL_DIR with step directories."""
    p = storage.Path(path)
    if p.name == MSGPACK_FILE and p.is_file():
        return True
    return p.is_dir() and (_is_step_dir(path) or bool(_steps(path)))


def find_step_dir(path: str, step: int | None = None) -> tuple[str, int | None]:
    """(step directory, step) of a T5X MODEL_DIR (latest step, or `step`), step directory or
    msgpack `checkpoint` file."""
    p = storage.Path(path)
    if p.name == MSGPACK_FILE and p.is_file():
        path = str(p.parent)
    if _is_step_dir(path):
        m = _STEP_DIR.match(storage.Path(path).name)
        found = int(m.group(1)) if m else None
        if step is not None and found != step:
            raise T5XCheckpointError(f"{path}: a step directory of step {found}, not step {step}")
        return path, found
    steps = _steps(path)
    if not steps:
        what = "no such path" if not p.exists() else "not a T5X checkpoint"
        raise T5XCheckpointError(
            f"{path}: {what} (expected a '{MSGPACK_FILE}' msgpack file, or "
            f"'{STEP_PREFIX}_<step>/{MSGPACK_FILE}' directories)"
        )
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise T5XCheckpointError(f"{path}: no step {step} (steps: {sorted(steps)})")
    return steps[step], step


# -------------------------------------------------------------------------------- reading


def _is_spec(x: Any) -> bool:
    return isinstance(x, dict) and {"driver", "kvstore", "metadata"} <= set(x)


def _flatten(tree: Any, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    if isinstance(tree, dict) and not _is_spec(tree):
        for k, v in tree.items():
            yield from _flatten(v, (*prefix, str(k)))
    else:
        yield prefix, tree


@dataclasses.dataclass(frozen=True)
class T5XCheckpoint:
    """The parameters (`target`) of one T5X step directory, not yet read: each leaf is an array
    stored in the msgpack file or the tensorstore spec of a zarr array."""

    directory: str  # the step directory
    step: int | None
    target: dict[Path, Any]
    where: str  # what errors name: the msgpack file, the orbax state directory, or memory

    def shape(self, path: Path) -> tuple[int, ...]:
        leaf = self.target[path]
        return tuple(leaf["metadata"]["shape"]) if _is_spec(leaf) else tuple(np.shape(leaf))


def _open_orbax(step_dir: str, found: int | None) -> T5XCheckpoint:
    """The `target` leaves of an orbax-format T5X step, as specs of zarr arrays in its OCDBT
    store (their shapes read from the arrays' metadata)."""
    import tensorstore as ts

    state = storage.join(step_dir, ORBAX_STATE)
    meta_file = storage.join(state, ORBAX_METADATA)
    try:
        keys = [
            [k["key"] for k in entry["key_metadata"]]
            for entry in storage.read_json(meta_file)["tree_metadata"].values()
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise T5XCheckpointError(f"{meta_file}: not an orbax T5X checkpoint ({e})") from e
    base = storage.resolve(state).rstrip("/") + "/"
    base = base if "://" in base else f"file://{base}"
    target = {}
    for key in keys:
        if key[0] != "target":
            continue
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": base, "path": ".".join(key)},
        }
        try:
            shape = ts.open(spec, open=True).result().shape
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/bare errors
            raise T5XCheckpointError(f"{state}: cannot open {'.'.join(key)}: {e}") from e
        target[tuple(key[1:])] = {**spec, "metadata": {"shape": list(shape)}}
    if not target:
        raise T5XCheckpointError(f"{meta_file}: not a T5X checkpoint (no 'target' parameters)")
    return T5XCheckpoint(step_dir, found, target, state)


def open_checkpoint(path: str, step: int | None = None) -> T5XCheckpoint:
    """Reads the msgpack file (or orbax metadata) of a T5X checkpoint; arrays stay on disk."""
    from flax import serialization

    step_dir, found = find_step_dir(path, step)
    file = storage.join(step_dir, MSGPACK_FILE)
    if not storage.Path(file).is_file():
        return _open_orbax(step_dir, found)
    try:
        contents = serialization.msgpack_restore(storage.read_bytes(file))
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types
        raise T5XCheckpointError(f"{file}: not a T5X msgpack checkpoint ({e})") from e
    if isinstance(contents, dict) and "optimizer" in contents and "version" in contents:
        contents = contents["optimizer"]  # version >= 1; version 0 has target at the top
    if not isinstance(contents, dict) or not isinstance(contents.get("target"), dict):
        raise T5XCheckpointError(f"{file}: not a T5X checkpoint (no 'target' parameters)")
    return T5XCheckpoint(step_dir, found, dict(_flatten(contents["target"])), file)


def _native_path(path: Path) -> Path:
    # T5X's untied output projection lives in the decoder; ours at the top
    return path[1:] if path[:2] == ("decoder", "logits_dense") else path


def _t5x_path(path: Path) -> Path:
    return ("decoder", *path) if path[0] == "logits_dense" else path


def _gin_bindings() -> dict[str, Any]:
    """The T5Config fields gin binds (gin raises ValueError for an unbound one)."""
    import gin

    bound = {}
    for field in (*SHAPE_FIELDS, "mlp_activations"):
        try:
            bound[field] = gin.query_parameter(f"distill_sbs.network.T5Config.{field}")
        except ValueError:
            continue
    return bound


def _layer_count(shapes: dict[Path, tuple[int, ...]], stack: str) -> int:
    layers = {p[1] for p in shapes if p[0] == stack and p[1].startswith("layers_")}
    return len(layers)


def read_config(ckpt: T5XCheckpoint) -> T5Config:
    """The T5Config of a T5X checkpoint: shape from the arrays, the rest from gin's T5Config
    bindings or the defaults. A gin binding that contradicts the checkpoint is an error."""
    shapes = {_native_path(p): ckpt.shape(p) for p in ckpt.target}
    where = ckpt.where

    def shape(*path: str) -> tuple[int, ...]:
        if path not in shapes:
            raise T5XCheckpointError(f"{where}: no parameter {'/'.join(_t5x_path(path))}")
        return shapes[path]

    vocab, emb = shape("token_embedder", "embedding")
    heads, buckets = shape("encoder", "relpos_bias", "rel_embedding")
    joined = shape("encoder", "layers_0", "attention", "query", "kernel")[1]
    mlp = shape("encoder", "layers_0", "mlp", "wo", "kernel")[0]
    n_wi = sum(1 for p in shapes if p[:3] == ("encoder", "layers_0", "mlp") and p[3] != "wo")
    found = {
        "vocab_size": vocab,
        "emb_dim": emb,
        "num_heads": heads,
        "head_dim": joined // heads,
        "mlp_dim": mlp,
        "num_encoder_layers": _layer_count(shapes, "encoder"),
        "num_decoder_layers": _layer_count(shapes, "decoder"),
        "logits_via_embedding": ("logits_dense", "kernel") not in shapes,
        "relative_attention_num_buckets": buckets,
    }
    gin_fields = _gin_bindings()
    wrong = [f for f in SHAPE_FIELDS if f in gin_fields and gin_fields[f] != found[f]]
    acts = gin_fields.get("mlp_activations")
    if acts is not None and len(acts) != n_wi:
        wrong.append("mlp_activations")
    if wrong:
        have = ", ".join(
            f"{f}={found[f]}" if f != "mlp_activations" else f"{n_wi} MLP input kernel(s)"
            for f in wrong
        )
        says = ", ".join(f"{f}={gin_fields[f]!r}" for f in wrong)
        raise T5XCheckpointError(f"{where}: the checkpoint has {have}; the gin model says {says}")
    if acts is None:
        defaults = {1: ("relu",), 2: ("gelu", "linear")}  # T5 1.0; T5 1.1 and Flan-T5
        if n_wi not in defaults:
            raise T5XCheckpointError(
                f"{where}: {n_wi} MLP input kernels; bind T5Config.mlp_activations in gin"
            )
        acts = defaults[n_wi]
    return dataclasses.replace(T5Config(), **found, mlp_activations=tuple(acts))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one T5X array becomes one native parameter: the native shape, and for a native block
    index the T5X index to read and the function that turns that T5X block into the native one
    (reshapes and selections only, so a block equals the same block of the whole conversion)."""

    native_shape: tuple[int, ...]
    to_t5x: Callable[[np.ndarray], np.ndarray]
    source: Callable[[Index], tuple[Index, Callable[[np.ndarray], np.ndarray]]]


def _layout(path: Path, native_shape: tuple[int, ...]) -> _Layout:
    if len(path) >= 2 and path[-1] == "kernel" and path[-2] in ("query", "key", "value"):
        e, h, d = native_shape

        def qkv(i: Index):  # native [e, h, d] = T5X [e, h*d]
            se, sh, sd = i
            rows = slice(sh.start * d, sh.stop * d)  # whole heads: head_dim is never split
            return (se, rows), lambda b: b.reshape(b.shape[0], -1, d)[:, :, sd]

        return _Layout(native_shape, lambda x: x.reshape(e, h * d), qkv)
    if len(path) >= 2 and path[-1] == "kernel" and path[-2] == "out":
        h, d, e = native_shape

        def out(i: Index):  # native [h, d, e] = T5X [h*d, e]
            sh, sd, se = i
            return (slice(sh.start * d, sh.stop * d), se), lambda b: b.reshape(-1, d, b.shape[1])[
                :, sd, :
            ]

        return _Layout(native_shape, lambda x: x.reshape(h * d, e), out)
    return _Layout(native_shape, lambda x: x, lambda i: (i, lambda b: b))


def _kvstore(step_dir: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The tensorstore kvstore of a spec whose path is relative to the step directory; specs
    written on GCS name a dummy bucket, so the bucket always comes from where the checkpoint is."""
    kv = dict(spec["kvstore"])
    rel = kv.get("path", spec.get("path"))  # tensorstore < 0.1.14 kept the path at the top
    if rel is None:
        raise T5XCheckpointError(f"{step_dir}: a tensorstore spec without a path: {spec}")
    resolved = storage.resolve(step_dir)
    m = re.fullmatch(r"gs://([^/]+)/?(.*)", resolved)
    if m:
        return {"driver": "gcs", "bucket": m.group(1), "path": f"{m.group(2)}/{rel}".lstrip("/")}
    if "://" in resolved:
        raise T5XCheckpointError(f"{step_dir}: T5X arrays are read locally or from gs:// only")
    return {"driver": "file", "path": f"{resolved}/{rel}"}


def _store(step_dir: str, leaf: dict[str, Any]) -> Any:
    import tensorstore as ts

    spec = {k: v for k, v in leaf.items() if k not in ("path", "metadata")}
    if leaf["kvstore"]["driver"] != "ocdbt":  # orbax's are absolute already
        spec["kvstore"] = _kvstore(step_dir, leaf)
    # chunks and compressor are read from the array's own .zarray; only the shape is checked
    spec["metadata"] = {"shape": list(leaf["metadata"]["shape"])}
    try:
        return ts.open(spec, open=True, read=True).result()
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/bare errors
        raise T5XCheckpointError(f"{step_dir}: cannot open {leaf['kvstore']}: {e}") from e


def _read(source: Any, index: Index) -> np.ndarray:
    """The block `index` of a stored array (a tensorstore or an array from the msgpack file);
    one place for every read, which tests count."""
    if isinstance(source, np.ndarray):
        return source[index]
    return source[index].read().result()


def _float32(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fV":  # "V": ml_dtypes' bfloat16
        raise T5XCheckpointError(f"{name} has dtype {x.dtype}; weights must be floating point")
    return x.astype(np.float32)


def _native_paths(config: T5Config) -> dict[Path, tuple[int, ...]]:
    """Every native parameter's path and shape (the network's, not models.py's: no import cycle
    with models and convert, which reach this module)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from distill_sbs.network import Transformer

    tokens = jnp.ones((1, 8), jnp.int32)
    boxed = jax.eval_shape(
        lambda r: Transformer(config).init({"params": r}, tokens, tokens)["params"],
        jax.random.PRNGKey(0),
    )
    return {
        tuple(str(k.key) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed))
    }


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Any, path: Path) -> Any:
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def read_params(
    ckpt: T5XCheckpoint, config: T5Config, abstract_params: Any = None
) -> dict[str, Any]:
    """Native float32 params of a T5X checkpoint whose shape `config` describes.

    With `abstract_params` (jax.ShapeDtypeStructs with shardings) each parameter is built in its
    sharding from the blocks its devices hold: a host reads those blocks of the zarr arrays (each
    distinct block once, replicas share it) and never a whole array it does not hold.
    """
    import jax

    where = ckpt.where
    native = _native_paths(config)
    unexpected = sorted(set(ckpt.target) - {_t5x_path(p) for p in native})
    if unexpected:
        raise T5XCheckpointError(
            f"{where}: parameters a T5 of this shape does not have: "
            f"{['/'.join(p) for p in unexpected[:8]]}"
        )
    params: dict[str, Any] = {}
    for path, native_shape in native.items():
        t5x = _t5x_path(path)
        name = f"{where}: parameter {'/'.join(t5x)}"
        if t5x not in ckpt.target:
            raise T5XCheckpointError(f"{name} is missing")
        layout = _layout(path, native_shape)
        got = ckpt.shape(t5x)
        want = layout.to_t5x(np.zeros(native_shape, np.int8)).shape
        if got != want:
            raise T5XCheckpointError(f"{name} has shape {got}; the model needs {want}")
        leaf = ckpt.target[t5x]
        source = _store(ckpt.directory, leaf) if _is_spec(leaf) else np.asarray(leaf)
        blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

        def block(index: Index, layout=layout, source=source, blocks=blocks, name=name):
            index = partitioning.concrete_index(index, layout.native_shape)
            bounds = tuple((s.start, s.stop) for s in index)
            if bounds not in blocks:
                t5x_index, finish = layout.source(index)
                x = _float32(name, _read(source, t5x_index))
                blocks[bounds] = np.ascontiguousarray(finish(x))
            return blocks[bounds]

        target = _get(abstract_params, path) if abstract_params is not None else None
        if abstract_params is not None and target is None:
            raise T5XCheckpointError(f"{name}: the target model has no such parameter")
        if target is not None and tuple(target.shape) != native_shape:
            raise T5XCheckpointError(
                f"{name} gives shape {native_shape}; the target model wants {tuple(target.shape)}"
            )
        sharding = getattr(target, "sharding", None)
        if sharding is None:
            value = block(tuple(slice(None) for _ in native_shape))
        else:
            value = jax.make_array_from_callback(native_shape, sharding, block)
        _set(params, path, value)
    return params


def params_from_tree(target: Any) -> tuple[T5Config, dict[str, Any]]:
    """(config, native params) of T5X parameters in memory (a T5X train state's `params`)."""
    from flax.core import unfreeze

    tree = {k: np.asarray(v) for k, v in _flatten(unfreeze(target))}
    ckpt = T5XCheckpoint("", None, tree, "T5X parameters")
    config = read_config(ckpt)
    return config, read_params(ckpt, config)


def default_vocabulary(config: T5Config) -> str | None:
    """The vocabulary a T5X checkpoint cannot name: gin's DatasetOptions.vocab_path or
    $DISTILL_SBS_VOCAB when set, else the packaged T5 vocabulary for an embedding with room for
    it, else None (with a warning)."""
    import os

    from distill_sbs.data import options

    chosen = options.get_options().vocab_path or os.environ.get(options.VOCAB_ENV)
    if chosen:
        return chosen
    if config.vocab_size >= _T5_VOCAB_SIZE:
        return options.DEFAULT_T5_VOCAB
    logging.warning(
        "T5X checkpoint with %d embedding rows, too few for the T5 vocabulary: no vocabulary "
        "(set $%s or gin DatasetOptions.vocab_path to give one)",
        config.vocab_size,
        options.VOCAB_ENV,
    )
    return None


def load(
    path: str, abstract_params: Any = None, *, step: int | None = None
) -> tuple[T5Config, dict[str, Any], str | None]:
    """(config, params, vocabulary file or None) of a T5X checkpoint (MODEL_DIR, step directory
    or msgpack file; local or gs://), optionally straight into the shardings of
    `abstract_params`."""
    ckpt = open_checkpoint(path, step)
    config = read_config(ckpt)
    params = read_params(ckpt, config, abstract_params)
    return config, params, default_vocabulary(config)


# -------------------------------------------------------------------------------- writing


def _chunks(shape: tuple[int, ...], itemsize: int) -> list[int]:
    """A chunk of at most _CHUNK_BYTES: whole trailing dimensions, rows of the first."""
    if not shape:
        return []
    row = math.prod(shape[1:]) * itemsize
    return [max(1, min(shape[0], _CHUNK_BYTES // max(row, 1))), *shape[1:]]


def save(
    out_dir: str,
    params: Any,
    config: T5Config,
    *,
    step: int = 0,
    dtype: str = "float32",
) -> str:
    """Writes native `params` as a T5X checkpoint MODEL_DIR/checkpoint_<step> (local or gs://) that
    upstream T5X restores (`load_t5x_checkpoint`, INITIAL_CHECKPOINT_PATH). No optimizer state:
    T5X fills it when restoring with `RestoreCheckpointConfig.fallback_to_scratch = True`. The
    msgpack file is written last: a step directory that has it is complete. Returns that
    directory."""
    import ml_dtypes
    import tensorstore as ts
    from flax import serialization

    if dtype not in ("float32", "bfloat16"):
        raise T5XCheckpointError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    step_dir = storage.join(out_dir, f"{STEP_PREFIX}_{step}")
    if storage.exists(storage.join(step_dir, MSGPACK_FILE)):
        raise T5XCheckpointError(f"{step_dir}: already holds a T5X checkpoint")
    storage.makedirs(step_dir)
    target: dict[str, Any] = {}
    for path, shape in _native_paths(config).items():
        value = _get(params, path)
        if value is None:
            raise T5XCheckpointError(f"params: missing {'/'.join(path)}")
        if tuple(np.shape(value)) != shape:
            raise T5XCheckpointError(
                f"params {'/'.join(path)} has shape {np.shape(value)}; the config wants {shape}"
            )
        t5x = _t5x_path(path)
        x = _layout(path, shape).to_t5x(np.asarray(value, np.float32)).astype(np_dtype)
        spec = {
            "driver": "zarr",
            "dtype": dtype,
            "kvstore": {"driver": "file", "path": ".".join(("target", *t5x))},
            "metadata": {
                "chunks": _chunks(x.shape, x.dtype.itemsize),
                "compressor": {"id": "gzip"},
                "shape": list(x.shape),
            },
        }
        open_spec = {**spec, "kvstore": _kvstore(step_dir, spec)}
        store = ts.open(open_spec, create=True, delete_existing=True).result()
        store.write(x).result()
        _set(target, t5x, spec)
    contents = {
        "version": VERSION,
        "optimizer": {"target": target, "state": {"step": np.asarray(step, np.int32)}},
    }
    storage.write_bytes(
        storage.join(step_dir, MSGPACK_FILE), serialization.msgpack_serialize(contents)
    )
    return step_dir


# ---------------------------------------------------------------------------- conversions


def t5x_to_native(checkpoint: str, out_dir: str) -> None:
    """Converts a T5X checkpoint (latest step of a MODEL_DIR, a step directory or its msgpack
    file) into a native checkpoint directory, with `default_vocabulary`."""
    from distill_sbs import checkpoints

    config, params, vocab = load(checkpoint)
    checkpoints.save_native(out_dir, params, config, vocab)


def native_to_t5x(checkpoint: str, out_dir: str, dtype: str = "float32") -> None:
    """Writes a native checkpoint (dir, MODEL_DIR or step dir) as a T5X checkpoint in `out_dir`
    (checkpoint_<step>: the native step, or 0)."""
    from distill_sbs import checkpoints

    ckpt = checkpoints.load_native(checkpoint)
    save(out_dir, ckpt.params, ckpt.config, step=ckpt.step or 0, dtype=dtype)
