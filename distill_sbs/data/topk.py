"""Saved teacher top-k log-probabilities per target token (offline logit distillation): the file
that teachers/topk.py writes and training reads, and the batch features it becomes (decoded in
the train step by distillation.OfflineTopK).

One `.npz` file per dataset split (numpy, uncompressed; `bytes_per_token` reports its size):

    keys       bytes [n]       "<example id>\\t<objective name>" (UTF-8) of each stored target
    offsets    int64 [n + 1]   rows of entry i are offsets[i]:offsets[i + 1]
    targets    uint16|uint32 [rows]     the target token ids (EOS included) the teacher scored
    ids        uint16|uint32 [rows, k]  the teacher's k most likely next tokens, best first
    logprobs   float16 [rows, k]        their log-probabilities (temperature 1)
    vocab_size int

Each example of the train split finds its entry by (id, objective); the stored targets must equal
the example's tokenized target, so a file written for other records or another tokenizer is an
error rather than silent noise. In a batch, the entries travel through seqio packing as two
int32 features of shape [length * k] (ID_FEATURE, LOGPROB_FEATURE): ids + 1 and the float32 bits
of the log-probabilities + 1, so that no stored value is 0 (seqio's packer measures a sequence by
its non-zero entries; 0 is padding) and the log-probabilities pass unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import gin
import numpy as np

from distill_sbs import storage
from distill_sbs.data.feature_converter import TOPK_EXAMPLE_FEATURES
from distill_sbs.errors import UserError

EXAMPLE_IDS, EXAMPLE_LOGPROBS = TOPK_EXAMPLE_FEATURES  # int32 [target length, k], encoded
ID_FEATURE = TOPK_EXAMPLE_FEATURES[EXAMPLE_IDS]  # model features, int32 [batch, length * k]
LOGPROB_FEATURE = TOPK_EXAMPLE_FEATURES[EXAMPLE_LOGPROBS]


class TopKError(UserError):
    """A top-k file that does not fit the records or holds invalid values."""


@gin.configurable
def teacher_topk_path(path: str | None = None) -> str | None:
    """The top-k file of the train split (gin: `teacher_topk_path.path = "..."`); None: none."""
    return path


@dataclasses.dataclass
class TopKStore:
    keys: list[str]
    offsets: np.ndarray
    targets: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    vocab_size: int
    path: str = "<memory>"

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def entry(self, example_id: str, objective: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(targets [T], ids [T, k], logprobs [T, k]) of one example's target."""
        index = self._index.get(_key(example_id, objective))
        if index is None:
            raise TopKError(
                f"{self.path}: no top-k entry for example {example_id!r} (objective "
                f"{objective!r}); the file was written for other records"
            )
        a, b = self.offsets[index], self.offsets[index + 1]
        return self.targets[a:b], self.ids[a:b], self.logprobs[a:b]

    @property
    def _index(self) -> dict[str, int]:
        if not hasattr(self, "_index_cache"):
            self._index_cache = {k: i for i, k in enumerate(self.keys)}
        return self._index_cache


def _key(example_id: str, objective: str) -> str:
    return f"{example_id}\t{objective}"


def _id_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def validate(ids: np.ndarray, logprobs: np.ndarray, vocab_size: int, where: str) -> None:
    """One TopKError for NaN or positive log-probabilities, out-of-range or repeated ids."""
    if ids.shape != logprobs.shape or ids.ndim != 2:
        raise TopKError(f"{where}: ids {ids.shape} and log-probs {logprobs.shape} must be [T, k]")
    if np.isnan(logprobs).any():
        row = int(np.argwhere(np.isnan(logprobs))[0, 0])
        raise TopKError(f"{where}: NaN log-probability at target token {row}")
    if (logprobs > 1e-3).any():
        raise TopKError(f"{where}: positive log-probability {float(logprobs.max())}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise TopKError(f"{where}: token id out of range [0, {vocab_size})")
    ordered = np.sort(ids, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise TopKError(f"{where}: a token id repeats within one position's top-k")


def save(
    path: str,
    entries: Sequence[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]],
    vocab_size: int,
) -> None:
    """Writes (example id, objective, targets [T], ids [T, k], logprobs [T, k]) entries."""
    keys, targets, ids, logprobs, offsets = [], [], [], [], [0]
    for example_id, objective, tgt, top_ids, top_lp in entries:
        where = f"top-k of {example_id!r} ({objective})"
        validate(np.asarray(top_ids), np.asarray(top_lp, np.float32), vocab_size, where)
        if len(tgt) != len(top_ids):
            raise TopKError(f"{where}: {len(tgt)} targets but {len(top_ids)} top-k rows")
        keys.append(_key(example_id, objective))
        targets.append(np.asarray(tgt))
        ids.append(np.asarray(top_ids))
        logprobs.append(np.asarray(top_lp))
        offsets.append(offsets[-1] + len(tgt))
    dtype = _id_dtype(vocab_size)
    # a file object: np.savez would append ".npz" to a bare path
    with storage.Path(path).open("wb") as f:
        np.savez(
            f,
            keys=np.asarray([k.encode() for k in keys], np.bytes_),  # 1 byte/char, not 4
            offsets=np.asarray(offsets, np.int64),
            targets=np.concatenate(targets).astype(dtype),
            ids=np.concatenate(ids).astype(dtype),
            logprobs=np.concatenate(logprobs).astype(np.float16),
            vocab_size=np.int64(vocab_size),
        )


def load(path: str) -> TopKStore:
    """Reads and validates a top-k file."""
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no such top-k file")
    with storage.Path(path).open("rb") as f, np.load(f) as z:
        store = TopKStore(
            keys=[k.decode() for k in z["keys"].tolist()],
            offsets=z["offsets"],
            targets=z["targets"].astype(np.int64),
            ids=z["ids"].astype(np.int64),
            logprobs=z["logprobs"],
            vocab_size=int(z["vocab_size"]),
            path=path,
        )
    validate(store.ids, store.logprobs.astype(np.float32), store.vocab_size, path)
    return store


def bytes_per_token(path: str) -> float:
    """File size / number of stored target tokens."""
    with storage.Path(path).open("rb") as f, np.load(f) as z:
        rows = int(z["offsets"][-1])
    return storage.Path(path).stat().length / max(rows, 1)


def encode(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 [T, k] features (ids + 1, float32 bits + 1): never 0, exact."""
    bits = np.ascontiguousarray(logprobs, np.float32).view(np.int32).astype(np.int64) + 1
    return (ids.astype(np.int32) + 1), bits.astype(np.int32)


def decode_features(enc_ids, enc_logprobs):
    """jax int32 [..., k] encoded features -> (ids int32, log-probs float32); padding (0) becomes
    id 0 with log-prob 0, a finite value the loss weights zero out."""
    import jax
    import jax.numpy as jnp

    pad = enc_ids == 0
    ids = jnp.where(pad, 0, enc_ids - 1)
    logprobs = jax.lax.bitcast_convert_type(jnp.where(pad, 1, enc_logprobs) - 1, jnp.float32)
    return ids, jnp.where(pad, 0.0, logprobs)


def attach(
    examples: list[dict], store: TopKStore, vocabulary, objective: str, eos_id: int = 1
) -> list[dict]:
    """Adds the encoded top-k features to the examples of one objective, after checking that
    each stored target is the example's tokenized target (with EOS). (The teacher's vocabulary
    size is checked against the student's when training starts: distillation.build_teacher.)"""
    out = []
    for ex in examples:
        targets, ids, logprobs = store.entry(str(ex["id"]), objective)
        want = list(vocabulary.encode(ex["targets"])) + [eos_id]
        if list(targets) != want:
            raise TopKError(
                f"{store.path}: the stored target of {ex['id']!r} ({objective}) has "
                f"{len(targets)} tokens, the record's {len(want)}"
                + (" (same length, other tokens)" if len(targets) == len(want) else "")
            )
        enc_ids, enc_lp = encode(ids, logprobs.astype(np.float32))
        out.append({**ex, EXAMPLE_IDS: enc_ids, EXAMPLE_LOGPROBS: enc_lp})
    return out
