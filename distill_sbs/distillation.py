"""Logit-level distillation in the train step: the teacher's token distributions
(docs/distillation.md). The offline side, scoring a teacher and writing its top-k file, is
teachers/topk.py; the file and its batch features are data/topk.py.

Two sources satisfy `trainer.Teacher` and run inside the jitted train step, once per (micro)batch:

    OnlineTeacher   a frozen local T5 (native checkpoint or Hugging Face folder), sharded with the
                    student's rules, optionally bfloat16; its logits are stop_gradient'ed
    OfflineTopK     the teacher's top-k log-probabilities per target token, saved with the records
                    (data/topk.py) and carried through packing as batch features
    CrossTokenizerPieces
                    a teacher of another tokenizer: its pieces file's features carried alike
                    (cross_tokenizer.py), giving the span-aligned or ULD term per student token

With an online teacher, `OnPolicy` (GKD) first replaces a fraction of each batch's targets by the
student's own samples, drawn in the step; the teacher then scores those. With a teacher behind
a server (`KD.server = @TeacherServer()`, another tokenizer), `ServedTeacher` samples them in a
jitted call of its own, has the server score them on the host (one round trip per step) and
hands the train step their pieces as CrossTokenizerPieces' features.

`KD` is the gin-configurable choice of source and divergence terms; `train.train(kd=...)`
turns it into the Trainer's teacher and `ObjectiveLoss` divergence fields, so that e.g.

    DatasetOptions.dss_alpha = 0.5      # 0.5 CE(label) + 0.5 CE(rationale)
    KD.weights = {"rationale": 0.3}     # + 0.3 KL(rationale)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from distill_sbs import cross_tokenizer, partitioning, storage
from distill_sbs.data import topk as topk_store
from distill_sbs.data.feature_converter import PIECES_MODEL_FEATURE
from distill_sbs.errors import UserError
from distill_sbs.losses import DIVERGENCES, SAMPLED_FEATURE
from distill_sbs.network import EOS_ID, PAD_ID

TEACHER_DTYPES = ("float32", "bfloat16")
logger = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TeacherServer:
    """A teacher behind an OpenAI-compatible server that scores text in its own tokenizer
    (`echo` + `logprobs`, as annotate_topk --pieces asks; vLLM or distill_sbs.serve), used to
    score the student's on-policy samples in training (ServedTeacher).

    url: the base URL (…/v1); model: the server's model name; api_key_env: the NAME of the
      environment variable holding the API key (the key is read when a request is sent and is
      never logged nor written to the config or a checkpoint).
    k: top log-probabilities asked per teacher token (a pieces file for the dataset's targets
      must hold the same k).
    decoder_only: the server is decoder-only and scores input + " " + target as one prompt.
    timeout: seconds per attempt; max_retries: retries of a failed request (with backoff), after
      which training stops with one line naming the URL; max_concurrency: requests at once;
      rows_per_request: sampled rows sent in one request.
    """

    url: str
    model: str
    api_key_env: str | None = None
    k: int = 8
    decoder_only: bool = False
    timeout: float = 60.0
    max_retries: int = 3
    max_concurrency: int = 4
    rows_per_request: int = 8

    def __post_init__(self) -> None:
        for name in ("k", "max_concurrency", "rows_per_request"):
            if getattr(self, name) < 1:
                raise UserError(f"TeacherServer.{name}={getattr(self, name)}: must be >= 1")
        if self.max_retries < 0 or self.timeout <= 0:
            raise UserError(
                f"TeacherServer: max_retries={self.max_retries} must be >= 0 and "
                f"timeout={self.timeout} > 0"
            )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KD:
    """Distillation settings of a training run.

    teacher: a teacher checkpoint (native or Hugging Face T5) run online; None reads the top-k
      log-probabilities saved with the records (teacher_topk_path.path).
    weights: objective name -> gamma_k, the weight of that objective's divergence term.
    kind, beta, skew, temperature, scale_by_t2: see losses.distillation_divergence (kind one of
      losses.DIVERGENCES; beta for "jsd", skew for "skew_kl" / "skew_reverse_kl").
    teacher_dtype: "bfloat16" runs the online teacher's parameters and activations in bf16.
    topk: use the k best of the stored log-probabilities (None: all stored).
    on_policy_fraction: GKD's lambda, the fraction of each batch's examples whose targets are the
      student's samples (OnPolicy; needs the online teacher and unpacked batches); 0: supervised.
    sample_temperature: the temperature of those samples (0: greedy).
    cross_tokenizer: "span" or "uld" distills from the pieces file of a teacher with another
      tokenizer (teacher_pieces_path.path; cross_tokenizer.py): the span-aligned divergence (kind
      one of cross_tokenizer.KINDS, beta for "jsd") or ULD; None: a teacher of this vocabulary.
    server: a TeacherServer scoring the on-policy samples (needs cross_tokenizer and
      on_policy_fraction > 0); the dataset's targets keep the pieces file's scores, if one is
      set, else CE only.
    """

    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    kind: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    temperature: float = 1.0
    scale_by_t2: bool = False
    teacher_dtype: str = "float32"
    topk: int | None = None
    on_policy_fraction: float = 0.0
    sample_temperature: float = 1.0
    cross_tokenizer: str | None = None
    server: TeacherServer | None = None

    def __post_init__(self) -> None:
        if self.kind not in DIVERGENCES:
            raise ValueError(f"KD.kind={self.kind!r}: expected one of {DIVERGENCES}")
        if self.kind.startswith("skew") and not 0.0 <= self.skew < 1.0:
            raise ValueError(f"KD.skew={self.skew}: {self.kind} needs 0 <= skew < 1")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"KD.teacher_dtype={self.teacher_dtype!r}: one of {TEACHER_DTYPES}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"KD.on_policy_fraction={self.on_policy_fraction}: not in [0, 1]")
        if self.sample_temperature < 0.0:
            raise ValueError(f"KD.sample_temperature={self.sample_temperature}: must be >= 0")
        if self.cross_tokenizer not in (None, *cross_tokenizer.LOSSES):
            raise UserError(
                f"KD.cross_tokenizer={self.cross_tokenizer!r}: expected one of "
                f"{cross_tokenizer.LOSSES} (or None: a teacher of the student's vocabulary)"
            )
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
            "skew": self.skew,
            "temperature": self.temperature,
            "scale_by_t2": self.scale_by_t2,
        }


@dataclasses.dataclass(frozen=True)
class OnPolicy:
    """On-policy distillation (GKD, Agarwal et al. 2024), run by the trainer at the start of each
    train step on the whole batch: the targets of `fraction` of its rows (round(fraction * B),
    spread evenly over the batch) become the student's own samples, drawn with `temperature` from
    the step's parameters (models.generate, jitted with the step; the key comes from the step,
    so a resumed run draws the same samples) up to the batch's target length. The teacher then
    scores them like any target; they carry the divergence but no CE (losses.SAMPLED_FEATURE).
    """

    fraction: float
    temperature: float = 1.0

    def rows(self, batch_size: int) -> np.ndarray:
        """int [n]: the rows whose targets are sampled (static: one compiled step)."""
        n = int(self.fraction * batch_size + 0.5)
        marks = np.floor(np.arange(batch_size + 1) * n / batch_size)
        return np.flatnonzero(np.diff(marks) > 0)

    def __call__(
        self, student: Any, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array
    ) -> Mapping[str, jax.Array]:
        """The batch with the sampled rows' targets replaced (unchanged when none are)."""
        rows = self.rows(batch["decoder_target_tokens"].shape[0])
        if rows.size == 0:
            return batch
        if "decoder_segment_ids" in batch:
            raise UserError(
                "KD.on_policy_fraction > 0 samples whole targets per row and needs unpacked "
                "batches: set train.pack = False"
            )
        samples = student.generate(
            jax.lax.stop_gradient(params),
            batch["encoder_input_tokens"][rows],
            max_decode_length=batch["decoder_target_tokens"].shape[1],
            method="sample",
            temperature=self.temperature,
            rng=rng,
        )
        return with_sampled_targets(batch, rows, samples)


def with_sampled_targets(
    batch: Mapping[str, jax.Array], rows: np.ndarray, samples: jax.Array
) -> dict[str, jax.Array]:
    """`batch` (unpacked) with the targets of `rows` replaced by `samples` int [n, length]: loss
    weights up to and including the first EOS (the whole row without one), decoder inputs shifted
    right from PAD_ID, the row's objective, and SAMPLED_FEATURE 1 on those tokens. A row that had
    no target tokens keeps none."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}  # numpy batches too (outside a step)
    is_eos = samples == EOS_ID
    keep = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
    keep &= jnp.any(batch["decoder_loss_weights"][rows] > 0, axis=1, keepdims=True)
    targets = jnp.where(keep, samples, PAD_ID).astype(batch["decoder_target_tokens"].dtype)
    inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=PAD_ID)
    out = dict(batch)
    out["decoder_target_tokens"] = batch["decoder_target_tokens"].at[rows].set(targets)
    out["decoder_input_tokens"] = batch["decoder_input_tokens"].at[rows].set(inputs)
    weights = batch["decoder_loss_weights"]
    out["decoder_loss_weights"] = weights.at[rows].set(keep.astype(weights.dtype))
    if "decoder_objective_ids" in batch:  # an unpacked row holds one example: one objective
        ids = batch["decoder_objective_ids"]
        out["decoder_objective_ids"] = ids.at[rows].set(jnp.broadcast_to(ids[rows, :1], keep.shape))
    sampled = jnp.zeros(weights.shape, jnp.float32)
    out[SAMPLED_FEATURE] = sampled.at[rows].set(keep.astype(jnp.float32))
    return out


class OnlineTeacher:
    """A frozen teacher model run on each (micro)batch: full logits [b, l, vocab], no gradients.
    `on_policy` (trainer.Teacher): GKD's sampling of the student's targets, or None."""

    def __init__(
        self, model: Any, params: Any, params_shardings: Any, on_policy: OnPolicy | None = None
    ) -> None:
        self.model = model
        self.params = params
        self.params_shardings = params_shardings
        self.on_policy = on_policy

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
    on_policy: OnPolicy | None = None,
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
    return OnlineTeacher(model, jax.device_put(params, shardings), shardings, on_policy)


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


class CrossTokenizerPieces:
    """A teacher of another tokenizer: its pieces file's features read from the batch
    (cross_tokenizer.decode_features), returned as the losses.TokenDivergence of `loss` ("span"
    or "uld") that ObjectiveLoss applies to the student's logits."""

    params: Any = None
    params_shardings: Any = None

    def __init__(self, loss: str) -> None:
        self.loss = loss

    def __call__(self, params: Any, batch: Mapping[str, jax.Array]) -> Any:
        del params
        if cross_tokenizer.PIECES_MODEL_FEATURE not in batch:
            raise UserError(
                f"KD.cross_tokenizer={self.loss!r}, but the batch has no "
                f"{cross_tokenizer.PIECES_MODEL_FEATURE!r}: set teacher_pieces_path.path"
            )
        feats = jax.lax.stop_gradient(cross_tokenizer.decode_features(batch))
        return functools.partial(cross_tokenizer.divergence, self.loss, feats=feats)


# (server, chunks of examples) -> each example's cross_tokenizer.Entry or None (not spelled):
# teachers.topk.score_samples, annotate_topk's client, which a higher layer hands down (train.py)
ServerScorer = Callable[[TeacherServer, list[list[dict[str, Any]]]], list[Any]]


class ServedTeacher(CrossTokenizerPieces):
    """On-policy distillation (GKD) from a teacher of another tokenizer behind a server: before
    each train step (trainer.Teacher.before_step) the `sampling` rows' targets are drawn from
    the student by OnPolicy in a jitted call of their own (the step's key, as in the step), the
    samples are fetched to the host, detokenized (cross_tokenizer.sample_pieces) and scored with
    their inputs through the server (`scorer`: teachers.topk.score_samples, annotate_topk's
    client), and their pieces are aligned with the sampled tokens into the batch's
    PIECES_MODEL_FEATURE rows;
    the jitted train step then runs as with a pieces file. The other rows keep the pieces file's
    features (none: CE only). A sample the teacher's pieces do not spell (a character outside
    its vocabulary, whitespace its tokenizer normalizes) gets no divergence term, and is logged.
    """

    on_policy = None  # the step samples nothing itself: the rows come sampled

    def __init__(
        self, loss: str, server: TeacherServer, sampling: OnPolicy, scorer: ServerScorer
    ) -> None:
        super().__init__(loss)
        self.server = server
        self.sampling = sampling
        self.scorer = scorer
        self._sampler: Any = None
        self._lookup: Callable[[str], int | None] | None = None  # built once, at the first step

    def before_step(self, trainer: Any, state: Any, batch: Mapping[str, jax.Array]) -> dict:
        """The batch with the sampled rows' targets and their teacher pieces (host round trip)."""
        rows = self.sampling.rows(batch["decoder_target_tokens"].shape[0])
        part = trainer.partitioner
        if self._sampler is None:

            def sample(params: Any, b: Mapping[str, jax.Array], step: jax.Array) -> Any:
                return self.sampling(trainer.model, params, b, trainer.sampling_rng(step))

            self._sampler = jax.jit(
                sample,
                in_shardings=(trainer.params_shardings, part.batch_sharding(), part.replicated()),
                out_shardings=part.batch_sharding(),
            )
        out = dict(batch)
        if rows.size:  # round(fraction * B) may be 0: no samples, the pieces feature still
            with part.activation_context():
                out = dict(self._sampler(state.params, batch, state.step))
        host = jax.device_get({k: out[k] for k in ("encoder_input_tokens", "decoder_target_tokens",
                                                   "decoder_loss_weights")})  # fmt: skip
        old = batch.get(PIECES_MODEL_FEATURE)
        pieces = self.sampled_pieces(
            host, rows, trainer.model.vocabulary, None if old is None else jax.device_get(old)
        )
        out[PIECES_MODEL_FEATURE] = part.host_batch_to_global({"p": pieces})["p"]
        return out

    def sampled_pieces(
        self,
        batch: Mapping[str, np.ndarray],
        rows: np.ndarray,
        vocabulary: Any,
        gold: np.ndarray | None = None,
    ) -> np.ndarray:
        """int32 [B, L * (4k + 7)]: PIECES_MODEL_FEATURE with the server's pieces of `rows`
        (whose targets are samples) and `gold`'s (the pieces file's, or nothing) elsewhere."""
        targets = np.asarray(batch["decoder_target_tokens"])
        b, length = targets.shape
        k = self.server.k
        width = length * (4 * k + 7)
        if gold is not None and gold.shape[-1] != width:
            raise UserError(
                f"teacher_pieces_path.path holds k={(gold.shape[-1] // length - 7) // 4} top "
                f"log-probs, TeacherServer.k={k}: the server's must be the file's"
            )
        out = np.zeros((b, width), np.int32) if gold is None else np.array(gold, np.int32)
        out[rows] = 0
        tok = getattr(vocabulary, "tokenizer", None)
        if tok is None:
            raise UserError("KD.server needs a SentencePiece student vocabulary to detokenize")
        weights = np.asarray(batch["decoder_loss_weights"])
        examples, samples = [], []
        for r in rows:
            ids = targets[r, weights[r] > 0].tolist()
            if not ids:  # a row without targets has no sample
                continue
            text, pieces, spans = cross_tokenizer.sample_pieces(tok, ids)
            inputs = np.asarray(batch["encoder_input_tokens"][r]).tolist()
            end = inputs.index(EOS_ID) if EOS_ID in inputs else len(inputs)
            examples.append({"id": f"sampled row {r}", "objective": "on-policy",
                             "inputs_text": vocabulary.decode(inputs[:end]),
                             "targets_text": text})  # fmt: skip
            samples.append((r, ids, pieces, spans))
        entries = self._score(examples)
        if self._lookup is None:  # a map over the whole vocabulary: not rebuilt every step
            self._lookup = cross_tokenizer.sentencepiece_lookup(tok)
        for (r, ids, pieces, spans), entry in zip(samples, entries, strict=True):
            if entry is not None:
                f = cross_tokenizer.features(entry, ids, pieces, self._lookup, k, length, spans)
                out[r] = cross_tokenizer.encode(f).reshape(-1)
        skipped = sum(e is None for e in entries)
        if skipped:
            logger.warning(
                "%s: the teacher's pieces do not spell %d of %d sampled targets: no "
                "divergence term on those",
                self.server.url,
                skipped,
                len(entries),
            )
        return out

    def _score(self, examples: list[dict[str, Any]]) -> list[Any]:
        """The server's entries of `examples` (None: not spelled); one line naming the URL when
        it is down, refuses or answers without logprobs."""
        if not examples:
            return []
        n = self.server.rows_per_request
        chunks = [examples[i : i + n] for i in range(0, len(examples), n)]
        try:
            return self.scorer(self.server, chunks)
        except (RuntimeError, UserError) as e:
            where = "" if str(e).startswith(self.server.url) else f"{self.server.url}: "
            raise UserError(f"KD.server: scoring the student's samples: {where}{e}") from e


def _cross_tokenizer_teacher(
    kd: KD, path: str | None, scorer: ServerScorer | None
) -> CrossTokenizerPieces:
    """The pieces file's teacher, or the server's (KD.server), after refusing the settings it
    cannot honour (one line each)."""
    if kd.cross_tokenizer is None:
        what = f"teacher_pieces_path.path={path} is" if kd.server is None else "KD.server scores in"
        raise UserError(
            f"{what} a teacher of another tokenizer: set "
            f"KD.cross_tokenizer to one of {cross_tokenizer.LOSSES}"
        )
    name = f"KD.cross_tokenizer={kd.cross_tokenizer!r}"
    served = kd.server is not None
    refusals = [
        (
            not path and not served,
            "reads a pieces file: set teacher_pieces_path.path (written by "
            "python -m distill_sbs.annotate_topk --pieces)",
        ),
        (
            served and kd.on_policy_fraction == 0,
            "with KD.server scores the student's samples: set KD.on_policy_fraction > 0 (for "
            "the dataset's targets write a pieces file: annotate_topk --pieces)",
        ),
        (served and jax.process_count() > 1, "with KD.server runs in one process only"),
        (
            kd.teacher is not None,
            f"distills from the pieces file, not KD.teacher={kd.teacher}: unset one",
        ),
        (
            bool(topk_store.teacher_topk_path()),
            "and teacher_topk_path.path name two teachers: unset one",
        ),
        (
            kd.on_policy_fraction > 0 and not served,
            f"cannot score the student's samples "
            f"(KD.on_policy_fraction={kd.on_policy_fraction}): the pieces "
            "file covers only the dataset's targets (KD.server can)",
        ),
        (kd.topk is not None, "uses every top log-prob of the pieces file: unset KD.topk"),
        (
            kd.temperature != 1.0 or kd.scale_by_t2,
            "has no temperature: leave KD.temperature at 1 and KD.scale_by_t2 False",
        ),
        (
            kd.cross_tokenizer == "span" and kd.kind not in cross_tokenizer.KINDS,
            f"compares spans with one of {cross_tokenizer.KINDS}, not KD.kind={kd.kind!r}",
        ),
        (
            kd.cross_tokenizer == "uld" and kd.kind != "forward_kl",
            f"is ULD's own distance: KD.kind={kd.kind!r} does not apply (leave it unset)",
        ),
    ]
    for refused, why in refusals:
        if refused:
            raise UserError(f"{name} {why}")
    if path and not storage.exists(path):
        raise UserError(f"teacher_pieces_path.path={path}: no such pieces file")
    if served:
        if scorer is None:
            raise ValueError("build_teacher: KD.server needs server_scorer (score_samples)")
        sampling = OnPolicy(kd.on_policy_fraction, kd.sample_temperature)
        return ServedTeacher(kd.cross_tokenizer, kd.server, sampling, scorer)
    return CrossTokenizerPieces(kd.cross_tokenizer)


def build_teacher(
    kd: KD,
    student_vocab_size: int,
    partitioner: partitioning.Partitioner,
    server_scorer: ServerScorer | None = None,
) -> OnlineTeacher | OfflineTopK | CrossTokenizerPieces:
    """The teacher source `kd` names, checked against the student's vocabulary size.
    server_scorer: how KD.server is asked (teachers.topk.score_samples)."""
    pieces = cross_tokenizer.teacher_pieces_path()
    if kd.cross_tokenizer is not None or pieces or kd.server is not None:
        return _cross_tokenizer_teacher(kd, pieces, server_scorer)
    if kd.teacher is None and kd.on_policy_fraction > 0:
        raise UserError(
            f"KD.on_policy_fraction={kd.on_policy_fraction} needs an online teacher to score the "
            "student's samples: set KD.teacher (saved top-k covers only the dataset's targets)"
        )
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
    on_policy = None
    if kd.on_policy_fraction > 0:
        on_policy = OnPolicy(kd.on_policy_fraction, kd.sample_temperature)
    return load_online_teacher(
        kd.teacher, student_vocab_size, partitioner, dtype=kd.teacher_dtype, on_policy=on_policy
    )
