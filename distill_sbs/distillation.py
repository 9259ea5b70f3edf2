"""Logit-level distillation: sources of the teacher's token distributions (docs/distillation.md).

Two sources satisfy `trainer.Teacher` and run inside the jitted train step, once per (micro)batch:

    OnlineTeacher   a frozen local T5 (native checkpoint or Hugging Face folder), sharded with the
                    student's rules, optionally bfloat16; its logits are stop_gradient'ed
    OfflineTopK     the teacher's top-k log-probabilities per target token, saved with the records
                    (data/topk.py) and carried through packing as batch features

`KD` is the gin-configurable choice of source and divergence terms; `training.train(kd=...)`
turns it into the Trainer's teacher and `ObjectiveLoss` divergence fields, so that e.g.

    DatasetOptions.dss_alpha = 0.5      # 0.5 CE(label) + 0.5 CE(rationale)
    KD.weights = {"rationale": 0.3}     # + 0.3 KL(rationale)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from distill_sbs import partitioning
from distill_sbs.data import topk as topk_store
from distill_sbs.losses import DIVERGENCES

TEACHER_DTYPES = ("float32", "bfloat16")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KD:
    """Distillation settings of a training run.

    teacher: a teacher checkpoint (native or Hugging Face T5) run online; None reads the top-k
      log-probabilities saved with the records (teacher_topk_path.path).
    weights: objective name -> gamma_k, the weight of that objective's divergence term.
    kind, beta, temperature, scale_by_t2: see losses.distillation_divergence.
    teacher_dtype: "bfloat16" runs the online teacher's parameters and activations in bf16.
    topk: use the k best of the stored log-probabilities (None: all stored).
    """

    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    scale_by_t2: bool = False
    teacher_dtype: str = "float32"
    topk: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in DIVERGENCES:
            raise ValueError(f"KD.kind={self.kind!r}: expected one of {DIVERGENCES}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"KD.teacher_dtype={self.teacher_dtype!r}: one of {TEACHER_DTYPES}")
        if not self.weights:
            raise ValueError(
                'KD.weights is empty; name the distilled objectives, e.g. {"rationale": 0.3}'
            )

    def loss_fields(self, objective_names: Sequence[str]) -> dict[str, Any]:
        """The ObjectiveLoss divergence fields for objectives in this id order."""
        unknown = sorted(set(self.weights) - set(objective_names))
        if unknown:
            raise ValueError(
                f"KD.weights names objective(s) {unknown}; this task's objectives are "
                f"{list(objective_names)}"
            )
        return {
            "divergence_weights": tuple(float(self.weights.get(n, 0.0)) for n in objective_names),
            "divergence": self.kind,
            "beta": self.beta,
            "temperature": self.temperature,
            "scale_by_t2": self.scale_by_t2,
        }


class OnlineTeacher:
    """A frozen teacher model run on each (micro)batch: full logits [b, l, vocab], no gradients."""

    def __init__(self, model: Any, params: Any, params_shardings: Any) -> None:
        self.model = model
        self.params = params
        self.params_shardings = params_shardings

    def __call__(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        from distill_sbs.network import Packing

        logits = self.model.logits(
            jax.lax.stop_gradient(params),
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            packing=Packing.from_features(batch),
        )
        return jax.lax.stop_gradient(logits.astype(jnp.float32))


def load_online_teacher(
    path: str,
    student_vocab_size: int,
    partitioner: partitioning.Partitioner,
    *,
    dtype: str = "float32",
) -> OnlineTeacher:
    """The teacher at `path` (native or HF T5), checked against the student's vocabulary and
    placed on the mesh with the same logical-axis rules as the student."""
    from distill_sbs import models

    model, params = models.load(path, dtype=dtype)
    if model.config.vocab_size != student_vocab_size:
        raise ValueError(
            f"KD.teacher={path}: its vocabulary has {model.config.vocab_size} ids, the student's "
            f"{student_vocab_size}; logit distillation needs the same vocabulary"
        )
    if dtype == "bfloat16":  # halves the teacher's memory and its matmuls' cost
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    shardings = partitioner.params_shardings(model.params_logical_axes())
    return OnlineTeacher(model, jax.device_put(params, shardings), shardings)


class OfflineTopK:
    """Top-k (ids, log-probs) [b, l, k] read from the batch (topk_store.ID_FEATURE and
    LOGPROB_FEATURE, written by the feature converter); `k` keeps the k best of those stored."""

    params: Any = None
    params_shardings: Any = None

    def __init__(self, k: int | None = None) -> None:
        self.k = k

    def __call__(self, params: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        del params
        if topk_store.ID_FEATURE not in batch:
            raise ValueError(
                "KD without KD.teacher reads saved top-k log-probabilities, but the batch has "
                f"no {topk_store.ID_FEATURE!r}: set teacher_topk_path.path to the top-k file"
            )
        ids, logprobs = topk_store.decode_features(
            batch[topk_store.ID_FEATURE], batch[topk_store.LOGPROB_FEATURE]
        )
        if ids.ndim == 2:  # [b, length * k] as the feature converter packs them
            shape = (*batch["decoder_target_tokens"].shape, -1)
            ids, logprobs = ids.reshape(shape), logprobs.reshape(shape)
        stored = ids.shape[-1]
        if self.k is not None:
            if self.k > stored:
                raise ValueError(f"KD.topk={self.k} is larger than the {stored} stored per token")
            ids, logprobs = ids[..., : self.k], logprobs[..., : self.k]
        return jax.lax.stop_gradient(ids), jax.lax.stop_gradient(logprobs)


def build_teacher(
    kd: KD, student_vocab_size: int, partitioner: partitioning.Partitioner
) -> OnlineTeacher | OfflineTopK:
    """The teacher source `kd` names, checked against the student's vocabulary size."""
    if kd.teacher is None:
        path = topk_store.teacher_topk_path()
        if not path:
            raise ValueError(
                "KD.teacher is None (offline distillation) but no top-k file is set: "
                "teacher_topk_path.path = '<file written by python -m distill_sbs.annotate_topk>'"
            )
        store = topk_store.load(path)
        if store.vocab_size != student_vocab_size:
            raise ValueError(
                f"{path}: written by a teacher with {store.vocab_size} vocabulary ids, the "
                f"student has {student_vocab_size}; logit distillation needs the same vocabulary"
            )
        if kd.topk is not None and kd.topk > store.k:
            raise ValueError(f"KD.topk={kd.topk} is larger than the {store.k} stored in {path}")
        return OfflineTopK(kd.topk)
    return load_online_teacher(kd.teacher, student_vocab_size, partitioner, dtype=kd.teacher_dtype)


def task_examples(mixture_or_task_name: str, split: str) -> list[dict[str, Any]]:
    """Tokenized examples of every objective, as training reads them (untrimmed, unshuffled):
    dicts with "id", "objective" (name), "inputs" and "targets" (int lists, EOS included) and
    "inputs_text" / "targets_text" (the texts they were tokenized from, for a teacher server;
    None where the task's tokenizer kept no `*_pretokenized` copy)."""
    import seqio

    from distill_sbs import data

    names = [o.name for o in data.get_objectives(mixture_or_task_name)]
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    out = []
    for task in tasks:
        ds = task.get_dataset(
            sequence_length={"inputs": 1 << 16, "targets": 1 << 16},
            split=split,
            shuffle=False,
            num_epochs=1,
            use_cached=False,
        )
        for ex in ds.as_numpy_iterator():
            out.append(
                {
                    "id": ex["id"].decode(),
                    "objective": names[int(ex["objective_id"][0])],
                    "inputs": ex["inputs"].tolist(),
                    "targets": ex["targets"].tolist(),
                    "inputs_text": _text(ex.get("inputs_pretokenized")),
                    "targets_text": _text(ex.get("targets_pretokenized")),
                }
            )
    return out


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class TeacherForcedTopK:
    """A T5's teacher-forced log_softmax (temperature 1) over given target tokens: per target
    token, its own log-probability and the k most likely next tokens (ids, log-probs, best
    first). Shared by `write_topk` and the server's scoring requests (serve/engine.py), so both
    give the same numbers for the same tokens."""

    def __init__(self, model: Any, params: Any, k: int) -> None:
        vocab = model.config.vocab_size
        if not 0 < k <= vocab:
            raise ValueError(f"top-k: k={k} must be in [1, {vocab}]")
        self.model, self.params, self.k = model, params, k

        @jax.jit
        def top(p: Any, enc: jax.Array, dec_in: jax.Array, tgt: jax.Array) -> tuple:
            logp = jax.nn.log_softmax(model.logits(p, enc, dec_in), axis=-1)
            lp, ids = jax.lax.top_k(logp, k)
            return ids, lp, jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]

        self._top = top

    def __call__(
        self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], rows: int = 0
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(top ids [T, k], top log-probs [T, k], target log-probs [T]) per (inputs, targets)
        pair (EOS included in both); `rows` pads the batch to that many rows (fewer shapes)."""
        pad_rows = max(rows - len(inputs), 0)
        enc = _pad([*inputs, *[[1]] * pad_rows])
        tgt = _pad([*targets, *[[1]] * pad_rows])
        dec_in = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
        ids, lp, token_lp = jax.device_get(self._top(self.params, enc, dec_in, tgt))
        return [
            (ids[r, : len(t)], lp[r, : len(t)], token_lp[r, : len(t)])
            for r, t in enumerate(targets)
        ]


def write_topk(
    model: Any,
    params: Any,
    mixture_or_task_name: str,
    output: str,
    *,
    k: int,
    split: str = "train",
    batch_size: int = 32,
) -> float:
    """Scores every target token of a registered task's `split` with a local teacher (teacher
    forcing, temperature 1) and saves its top-k log-probabilities (data/topk.py); returns the
    file's bytes per target token."""
    examples = task_examples(mixture_or_task_name, split)
    scorer = TeacherForcedTopK(model, params, k)
    entries = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        scored = scorer([e["inputs"] for e in chunk], [e["targets"] for e in chunk])
        for e, (ids, lp, _) in zip(chunk, scored, strict=True):
            entries.append((e["id"], e["objective"], e["targets"], ids, lp))
    return save_topk(output, entries, model.config.vocab_size)


def save_topk(
    output: str,
    entries: Sequence[tuple[str, str, Sequence[int], np.ndarray, np.ndarray]],
    vocab_size: int,
) -> float:
    """Writes the (id, objective, targets, top ids, top log-probs) entries (data/topk.py) and
    returns the file's bytes per target token: the one writer of local and server teachers."""
    topk_store.save(output, entries, vocab_size)
    return topk_store.bytes_per_token(output)


def _pad(rows: Sequence[Sequence[int]], multiple: int = 16) -> np.ndarray:
    """int32 [len(rows), L]: rows right-padded with 0 to a multiple of `multiple` (few shapes,
    few compilations)."""
    length = -(-max(len(r) for r in rows) // multiple) * multiple
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
