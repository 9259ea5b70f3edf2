"""Span-corruption pretraining (T5's objective) as a SeqIO task over plain text.

    register_span_corruption_task("mycorpus", files={"train": ["gs://b/corpus.txt"]},
                                  vocabulary=seqio.SentencePieceVocabulary(path, extra_ids=100))

registers `mycorpus` (a task, one objective): each document (a line of a text file, or the
`text_field` of a JSON-lines file; local or gs://) is tokenised, cut into chunks that fit
TASK_FEATURE_LENGTHS["inputs"] once corrupted, and corrupted afresh every epoch:

    tokens   Thank you for inviting me to your party last week .
    inputs   Thank you <X> me to your party <Y> week . </s>
    targets  <X> for inviting <Y> last <Z> </s>          (the paper's example)

Noise density 0.15 and mean noise span length 3 (gin: SpanCorruption.*). As in T5: the number of
noise tokens is round(length * density), the number of noise spans round(noise / mean span) (at
least 1 of each, at least one non-noise token), the spans alternate non-noise, noise, ... starting
with non-noise, and every such mask is equally likely. Each noise span becomes one sentinel in
the inputs; the targets are the noise spans, each after its sentinel; sentinels count down from
the last id of the vocabulary (<extra_id_0> = vocab_size - 1, then - 2, ...). Since T5's mask ends
with a noise span, its targets end with that span, not with a trailing sentinel (the paper's
illustration ends with one because its example ends with non-noise; `sentinel_spans` gives it
for such a mask). A rolled mask (random_roll below) may start with noise: T5's code would then
put each sentinel after its span in the targets; here it stays before it. Both end with EOS.
The feature converter packs the examples (PACK = True).

Unlike T5 (concatenate documents, then split), each document is corrupted on its own, so no span
crosses a document boundary; packing fills the rows instead. The random draws of one example come
from one numpy Generator seeded by SeqIO's per-example seed (deterministic for the task seed):
first the noise span lengths, then the non-noise span lengths, each a uniformly random
composition drawn as sorted cut points `rng.choice(n - 1, k - 1, replace=False) + 1`, then
(with SpanCorruption.random_roll, T5's option, off by default) the roll offset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from distill_sbs import storage
from distill_sbs.data.feature_converter import OBJECTIVE_FEATURE
from distill_sbs.data.records import RecordError, iter_json_lines

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """T5's span-corruption settings; gin `SpanCorruption.noise_density = 0.15` etc.

    random_roll: T5's option (off by default there and here) to rotate the mask by a uniform
    offset. Without it a short document (one noise span) always loses its last tokens, since the
    spans start with non-noise and end with noise; with it the span falls anywhere.
    """

    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
    random_roll: bool = False

    def __post_init__(self):
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"SpanCorruption.noise_density={self.noise_density} not in (0, 1)")
        if self.mean_noise_span_length < 1.0:
            raise ValueError(
                f"SpanCorruption.mean_noise_span_length={self.mean_noise_span_length} < 1"
            )


# ---- the algorithm (numpy) --------------------------------------------------------------------


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of `length` tokens (T5's rounding; length >= 2)."""
    num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_span)), 1)
    return num_noise, num_spans


def _composition(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of k positive parts summing to n, uniformly among all such compositions."""
    if k == 1:
        return np.array([n])
    cuts = np.sort(rng.choice(n - 1, k - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n]]))


def random_spans_noise_mask(
    length: int,
    rng: np.random.Generator,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    random_roll: bool = False,
) -> np.ndarray:
    """bool [length]: True on noise tokens; spans alternate non-noise, noise, ..., noise (with
    `random_roll`, then rotated right by an offset drawn uniformly from [0, max(length, 2)))."""
    padded = max(length, 2)  # as T5: a 1-token sequence keeps its token (mask [False, True][:1])
    num_noise, num_spans = span_counts(padded, noise_density, mean_noise_span_length)
    noise = _composition(num_noise, num_spans, rng)
    nonnoise = _composition(padded - num_noise, num_spans, rng)
    runs = np.stack([nonnoise, noise], axis=1).reshape(-1)
    mask = np.repeat(np.tile([False, True], num_spans), runs)
    if random_roll:
        mask = np.roll(mask, int(rng.integers(padded)))
    return mask[:length]


def sentinel_spans(tokens: np.ndarray, mask: np.ndarray, first_sentinel: int) -> np.ndarray:
    """`tokens` with each run of masked tokens replaced by one sentinel: first_sentinel for the
    first run, first_sentinel - 1 for the next, ... (T5's noise_span_to_unique_sentinel)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    previous = np.concatenate([[False], mask[:-1]])
    starts = mask & ~previous
    sentinels = first_sentinel + 1 - np.cumsum(starts)
    out = np.where(starts, sentinels, tokens)
    return out[~(mask & previous)].astype(tokens.dtype)


def span_corrupt(
    tokens: np.ndarray,
    rng: np.random.Generator,
    first_sentinel: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    random_roll: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one token sequence, without EOS."""
    mask = random_spans_noise_mask(
        len(tokens), rng, noise_density, mean_noise_span_length, random_roll
    )
    inputs = sentinel_spans(tokens, mask, first_sentinel)
    if len(mask) and mask[0]:  # only with random_roll: keep each sentinel before its own span
        return inputs, np.concatenate(
            [[first_sentinel], sentinel_spans(tokens, ~mask, first_sentinel - 1)]
        ).astype(inputs.dtype)
    return inputs, sentinel_spans(tokens, ~mask, first_sentinel)


def _lengths_after(tokens_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths with EOS of a corrupted `tokens_length`-token chunk."""
    num_noise, num_spans = span_counts(tokens_length, noise_density, mean_span)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def chunk_length(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(the longest chunk whose corrupted inputs fit `inputs_length` with EOS, its targets length);
    T5's random_spans_helper: 568 and 114 for inputs 512 at T5's settings."""
    if inputs_length < 3:
        raise ValueError(f"inputs length {inputs_length} is too short for span corruption")
    n = 2
    while _lengths_after(n + 1, noise_density, mean_span)[0] <= inputs_length:
        n += 1
    return n, _lengths_after(n, noise_density, mean_span)[1]


# ---- SeqIO preprocessors ----------------------------------------------------------------------


def split_chunks(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None
) -> tf.data.Dataset:
    """Each document's "targets" tokens cut into chunks of at most chunk_length(inputs) tokens;
    documents of fewer than 2 tokens are dropped (nothing to corrupt)."""
    opts = SpanCorruption()
    size = chunk_length(
        _inputs_length(sequence_length), opts.noise_density, opts.mean_noise_span_length
    )[0]

    def chunks(ex):
        tokens = ex["targets"]
        n = tf.size(tokens)
        rows = (n + size - 1) // size
        padded = tf.pad(tokens, [[0, rows * size - n]])
        lengths = tf.minimum(size, n - tf.range(rows) * size)
        ragged = tf.RaggedTensor.from_tensor(tf.reshape(padded, [rows, size]), lengths=lengths)
        return tf.data.Dataset.from_tensor_slices({"targets": ragged})

    dataset = dataset.filter(lambda ex: tf.size(ex["targets"]) >= 2)
    return dataset.flat_map(chunks).filter(lambda ex: tf.size(ex["targets"]) >= 2)


def _inputs_length(sequence_length: Mapping[str, int] | None) -> int:
    if not sequence_length or not sequence_length.get("inputs"):
        raise ValueError("span corruption needs TASK_FEATURE_LENGTHS['inputs']")
    return int(sequence_length["inputs"])


def corrupt(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    output_features: Mapping[str, seqio.Feature] | None = None,
) -> tf.data.Dataset:
    """{"targets": tokens} -> {"inputs", "targets", objective_id}: span corruption with a fresh
    per-example seed (SeqIO's, from the task seed; new draws every epoch)."""
    opts = SpanCorruption()
    vocabulary = output_features["targets"].vocabulary
    extra_ids = getattr(vocabulary, "extra_ids", 0)
    size = chunk_length(
        _inputs_length(sequence_length), opts.noise_density, opts.mean_noise_span_length
    )[0]
    _, most_spans = span_counts(max(size, 2), opts.noise_density, opts.mean_noise_span_length)
    if most_spans > extra_ids:  # T5 would count down into ordinary pieces
        raise ValueError(
            f"span corruption of {size}-token chunks needs {most_spans} sentinels; the "
            f"vocabulary has {extra_ids} extra ids"
        )
    first = vocabulary.vocab_size - 1

    def corrupt_numpy(tokens: np.ndarray, seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed.astype(np.uint32))
        return span_corrupt(
            tokens, rng, first, opts.noise_density, opts.mean_noise_span_length, opts.random_roll
        )

    @seqio.map_over_dataset(num_seeds=1)
    def apply(ex, seed):
        inputs, targets = tf.numpy_function(
            corrupt_numpy, [ex["targets"], seed], [tf.int32, tf.int32], stateful=False
        )
        inputs.set_shape([None])
        targets.set_shape([None])
        return {"inputs": inputs, "targets": targets, OBJECTIVE_FEATURE: tf.constant([0])}

    dataset = dataset.map(lambda ex: {"targets": tf.cast(ex["targets"], tf.int32)})
    return apply(dataset)


# ---- sources and registration -----------------------------------------------------------------


def read_documents(path: str, text_field: str | None = None) -> Iterator[str]:
    """The non-blank documents of a file: its lines, or `text_field` of each JSON line."""
    if text_field is None:
        with storage.Path(path).open("rb") as f:
            for raw in f:
                line = raw.decode("utf-8").strip()
                if line:
                    yield line
        return
    for obj, where in iter_json_lines(path, what="a document"):
        text = obj.get(text_field)
        if not isinstance(text, str):
            raise RecordError(f"{where}: no string field {text_field!r}")
        if text.strip():
            yield text


def _text_dataset(documents: Callable[[], Iterator[str]]) -> tf.data.Dataset:
    return tf.data.Dataset.from_generator(
        lambda: ({"text": d} for d in documents()),
        output_signature={"text": tf.TensorSpec([], tf.string)},
    )


def _file_source(
    files: Mapping[str, Sequence[str]], text_field: str | None
) -> seqio.FunctionDataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        paths = list(files[split])
        if shuffle_files:  # the task's shuffle buffer mixes documents; this mixes files
            paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]

        def documents() -> Iterator[str]:
            for p in paths:
                yield from read_documents(p, text_field)

        return _text_dataset(documents)

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(files))


def _memory_source(documents: Callable[[str], Sequence[str]], splits: Sequence[str]):
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # the task shuffles
        texts = list(documents(split))
        if not texts:
            raise ValueError(f"no documents on split {split!r}")
        return tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts, tf.string)})

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(splits))


def _to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(lambda ex: {"targets": ex["text"]}, num_parallel_calls=tf.data.AUTOTUNE)


def _output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """A pretraining task's features: inputs and targets with EOS, one objective id."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        OBJECTIVE_FEATURE: seqio.Feature(
            vocabulary=seqio.PassThroughVocabulary(size=0), add_eos=False, dtype=tf.int32, rank=1
        ),
    }


def register_span_corruption_task(
    name: str,
    *,
    vocabulary: seqio.Vocabulary,
    files: Mapping[str, Sequence[str]] | None = None,
    text_field: str | None = None,
    documents: Callable[[str], Sequence[str]] | None = None,
    splits: Sequence[str] = ("train",),
    shuffle_buffer_size: int = 10_000,
) -> str:
    """Registers (replacing) the SeqIO task `name`; returns it.

    Exactly one source: `files` ({split: [paths]}, plain text one document per line, or JSON
    lines with `text_field`; read through distill_sbs.storage, so gs:// works) or `documents`
    (split -> texts, for generated corpora). The vocabulary needs extra ids (the sentinels).
    """
    if (files is None) == (documents is None):
        raise ValueError("register_span_corruption_task needs exactly one of files=, documents=")
    if getattr(vocabulary, "extra_ids", 0) <= 0:
        raise ValueError(f"{name}: span corruption needs a vocabulary with extra ids (sentinels)")
    if files is not None:
        files = {s: [files[s]] if isinstance(files[s], str) else list(files[s]) for s in files}
        source = _file_source(files, text_field)
    else:
        source = _memory_source(documents, splits)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            _to_targets,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),  # what follows is redrawn every epoch
            split_chunks,
            corrupt,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=_output_features(vocabulary),
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name


def _pairs_source(pairs: Callable[[str], Sequence[tuple[str, str]]], splits: Sequence[str]):
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # the task shuffles
        rows = list(pairs(split))
        if not rows:
            raise ValueError(f"no examples on split {split!r}")
        inputs, targets = zip(*rows, strict=True)
        return tf.data.Dataset.from_tensor_slices(
            {"inputs": tf.constant(inputs, tf.string), "targets": tf.constant(targets, tf.string)}
        )

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(splits))


def _one_objective(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(
        lambda ex: {**ex, OBJECTIVE_FEATURE: tf.constant([0])},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def register_text_pairs_task(
    name: str,
    *,
    vocabulary: seqio.Vocabulary,
    pairs: Callable[[str], Sequence[tuple[str, str]]],
    splits: Sequence[str] = ("train",),
    shuffle_buffer_size: int = 10_000,
) -> str:
    """Registers (replacing) the SeqIO task `name` of (inputs, targets) texts from memory (split
    -> pairs), one objective like a span-corruption task, so that the two mix in one
    `seqio.Mixture` for pretraining (e.g. span corruption beside supervised questions, as
    T5's multi-task pretraining and Flan mix them); returns it."""
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=_pairs_source(pairs, splits),
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            _one_objective,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=_output_features(vocabulary),
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size,
    )
    return name
