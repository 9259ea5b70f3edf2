"""One call registers every method of a dataset as a SeqIO task or mixture.

    register_dataset("mydata", jsonl={"train": "mydata/train.jsonl", "test": "mydata/test.jsonl"},
                     metric="accuracy", teachers=("gpt",))

registers `<name>_<method>` for every training method of data/methods.py (finetune, distill,
dss, dss_llm, cot, multiteacher; the table says what objectives each trains on): a task for a
method of one objective, else a mixture whose sub-tasks are `<mixture>_<objective>` (non-word
characters as "_": `<mixture>_rationale_<t>`). Evaluation splits always hold gold labels; the
method's scored objective (label or cot) carries the dataset's metric. Registration reads no
file: records are loaded, subsampled and cached when a dataset is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from distill_sbs import cross_tokenizer, metrics
from distill_sbs.data import dss, methods, options, preprocessors, topk
from distill_sbs.data.feature_converter import (
    OBJECTIVE_FEATURE,
    PIECES_EXAMPLE_FEATURE,
    TOKEN_FEATURES,
    ObjectiveEncDecFeatureConverter,
)
from distill_sbs.data.records import Record, RecordError, read_jsonl
from distill_sbs.errors import UserError
from distill_sbs.parsing import parse_chain_of_thought


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str  # "label", "rationale", "rationale:<teacher>" or "cot"
    weight: float


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    load_split: Callable[[str], list[Record]]  # reads one split; called lazily, results cached
    splits: tuple[str, ...]
    metric: str
    vocabulary: seqio.Vocabulary
    teachers: tuple[str, ...]  # the first one serves the objectives not per teacher
    eval_split: str


_DATASETS: dict[str, DatasetSpec] = {}
_NAMES: dict[str, tuple[str, str]] = {}  # task or mixture name -> (dataset, method)
_CACHE: dict[tuple, list[Record]] = {}


def clear_cache() -> None:
    """Forgets loaded records (e.g. after changing the data directory in a test)."""
    _CACHE.clear()


def _slug(text: str) -> str:
    return re.sub(r"\W", "_", text)


def objectives(dataset: str, method: str) -> list[methods.ObjectiveSpec]:
    """The objectives of a training method on a registered dataset, in objective-id order."""
    return methods.get_training_method(method).bind(_DATASETS[dataset].teachers)


def get_objectives(mixture_or_task_name: str) -> list[Objective]:
    """The objectives of a registered method (or one of its sub-tasks), in objective-id order.

    Weights are read from gin (DatasetOptions) now, not at registration.
    """
    if mixture_or_task_name not in _NAMES:
        raise KeyError(
            f"{mixture_or_task_name!r} was not registered by distill_sbs.data.register_dataset "
            f"(import distill_sbs.tasks for the built-in datasets); known: {sorted(_NAMES)}"
        )
    dataset, method = _NAMES[mixture_or_task_name]
    opts = options.get_options()
    return [Objective(o.name, o.weight.value(opts, o.teacher)) for o in objectives(dataset, method)]


def dataset_and_method(mixture_or_task_name: str) -> tuple[str, str]:
    """(dataset, method) of a name registered by register_dataset, e.g. ("cqa", "dss")."""
    if mixture_or_task_name not in _NAMES:
        raise KeyError(
            f"{mixture_or_task_name!r} was not registered by distill_sbs.data.register_dataset"
        )
    return _NAMES[mixture_or_task_name]


def registered_datasets() -> list[str]:
    """Names of the datasets registered with register_dataset."""
    return sorted(_DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registration of a dataset (splits, metric, vocabulary, teachers, split loader)."""
    if name not in _DATASETS:
        raise KeyError(f"dataset {name!r} is not registered; known: {registered_datasets()}")
    return _DATASETS[name]


def load_records(name: str, split: str, *, subsample: bool = False) -> list[Record]:
    """The records of one split (cached); with `subsample`, the train split as training sees it."""
    spec = get_dataset_spec(name)
    if split not in _source_splits(spec):
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {spec.splits}")
    return _records(spec, split, subsample=subsample)


VALIDATION = "validation"


def _source_splits(spec: DatasetSpec) -> tuple[str, ...]:
    """The dataset's splits, plus "validation" (carved from train on demand) if it has none."""
    extra = (VALIDATION,) if VALIDATION not in spec.splits and "train" in spec.splits else ()
    return (*spec.splits, *extra)


def carve_validation(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(train, validation): validation is the first ceil(fraction * n) records of a permutation
    seeded by `seed`; both keep the records' original order. Deterministic for (n, fraction, seed).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} not in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(records))
    held = set(order[: math.ceil(fraction * len(records))].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def _carved(spec: DatasetSpec) -> bool:
    """Whether this dataset's validation split is carved from train under the current options."""
    return VALIDATION not in spec.splits and options.get_options().validation_fraction > 0


def _cache_key(spec: DatasetSpec, split: str) -> tuple:
    opts = options.get_options()
    return (spec.name, split, opts.data_dir or os.environ.get(options.DATA_DIR_ENV))


def _records(spec: DatasetSpec, split: str, subsample: bool = True) -> list[Record]:
    opts = options.get_options()
    carved = _carved(spec)
    if split == VALIDATION and VALIDATION not in spec.splits and not carved:
        raise ValueError(
            f"dataset {spec.name!r} has no validation split; set DatasetOptions.validation_fraction"
            " (e.g. 0.1) to hold out that fraction of train as one"
        )
    source = "train" if carved and split in ("train", VALIDATION) else split
    key = _cache_key(spec, source)
    if key not in _CACHE:
        _CACHE[key] = spec.load_split(source)
    records = _CACHE[key]
    if carved and source == "train":
        kept, held = carve_validation(records, opts.validation_fraction, opts.validation_seed)
        records = held if split == VALIDATION else kept
    if split == "train" and subsample:
        records = preprocessors.subsample(records, opts.train_fraction, opts.subsample_seed)
    return records


def build_examples(dataset: str, method: str, objective_id: int, split: str) -> list[dict]:
    """The text examples of one objective of one method on one split (its target's builder)."""
    spec = _DATASETS[dataset]
    objective = objectives(dataset, method)[objective_id]
    context = methods.BuildContext(
        objective_id=objective_id,
        prefix=objective.prefix,
        teacher=objective.teacher,
        train=split == "train",
        match=metrics.METRICS[spec.metric].match,
        where=f"{dataset}_{method}[{objective.name}]/{split}",
    )
    return objective.target.build(_records(spec, split), context)


def _to_tf(examples: Sequence[dict]) -> tf.data.Dataset:
    if not examples:
        raise ValueError("no examples")
    columns = {
        "id": tf.constant([e["id"] for e in examples], tf.string),
        "inputs": tf.constant([e["inputs"] for e in examples], tf.string),
        "targets": tf.constant([e["targets"] for e in examples], tf.string),
        # Shape [1] rather than a scalar: seqio.Evaluator measures the length of every feature.
        OBJECTIVE_FEATURE: tf.constant([[e["objective_id"]] for e in examples], tf.int32),
        "choices": tf.constant([e["choices"] for e in examples], tf.string),
    }
    for name in TOKEN_FEATURES:
        if name in examples[0]:  # [T_i, k] per example: a ragged column, sliced per example
            rows = [e[name] for e in examples]
            values = tf.constant(np.concatenate(rows), tf.int32)
            columns[name] = tf.RaggedTensor.from_row_lengths(values, [len(r) for r in rows])
    return tf.data.Dataset.from_tensor_slices(columns)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, key=None):
    del shuffle_files, seed  # in-memory examples; seqio's Task shuffles them with its seed
    dataset, method, objective_id = key
    examples = build_examples(dataset, method, objective_id, split)
    name = objectives(dataset, method)[objective_id].name
    if not examples:  # an empty source would make a repeated mixture spin forever
        raise UserError(
            f"{dataset}_{method}: objective {name!r} has no examples on split {split!r} (no "
            "record gives it a target: for a rationale objective, every teacher sample failed "
            "to parse, see the records' teachers.<name>[i].raw; or choose another method)"
        )
    path = topk.teacher_topk_path()
    if path and split == "train":  # saved teacher top-k for offline distillation (data/topk.py)
        examples = topk.attach(examples, topk.load(path), _DATASETS[dataset].vocabulary, name)
    pieces = cross_tokenizer.teacher_pieces_path()
    if pieces and split == "train":  # a teacher of another tokenizer (cross_tokenizer.py)
        entries = cross_tokenizer.load(pieces)
        vocabulary = _DATASETS[dataset].vocabulary
        examples = cross_tokenizer.attach(examples, entries, vocabulary, name, pieces)
    return _to_tf(examples)


# No SentencePiece piece of our vocabularies spans more than 16 characters (T5's longest); 64 per
# token leaves room for the whitespace runs the normaliser folds into one piece.
CHARS_PER_TOKEN = 64


def truncate_text(
    dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None
) -> tf.data.Dataset:
    """Cuts "inputs" and "targets" to CHARS_PER_TOKEN characters per token of their feature
    length before tokenising: a 1 MB record would otherwise be tokenised in full (every epoch)
    only for all but its first tokens to be trimmed. The kept tokens are the same."""
    if not sequence_length:
        return dataset

    def cut(ex: dict) -> dict:
        ex = dict(ex)
        for key in ("inputs", "targets"):
            if sequence_length.get(key):
                limit = sequence_length[key] * CHARS_PER_TOKEN
                ex[key] = tf.strings.substr(ex[key], 0, limit, unit="UTF8_CHAR")
        return ex

    return dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE)


def tokenize_text(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """seqio tokenization of "inputs" and "targets" only (objective_id is already an int)."""
    text = {k: output_features[k] for k in ("inputs", "targets")}
    return seqio.preprocessors.tokenize(dataset, text)


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def postprocess_label(output, example=None, is_target: bool = False):
    """Strips the text; a multiple-choice target carries its choices to the metric."""
    text = _decode(output).strip()
    if is_target and example is not None and "choices" in example:
        choices = _decode(example["choices"])
        if choices:
            return {"label": text, "choices": choices.split("\n")}
    return text


def postprocess_cot(output, example=None, is_target: bool = False):
    """A generated "<rationale> So the answer is <x>." is scored by its answer <x>."""
    if is_target:
        return postprocess_label(output, example, is_target)
    return parse_chain_of_thought(_decode(output)).answer or ""


def _output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        OBJECTIVE_FEATURE: seqio.Feature(
            vocabulary=seqio.PassThroughVocabulary(size=0),
            add_eos=False,
            dtype=tf.int32,
            rank=1,
        ),
    }


def _mixing_rate(objective: str, task: seqio.Task) -> float:
    del task
    rates = options.get_options().mixing_rates or {}
    return float(rates.get(objective, 1.0))


def _register_task(
    spec: DatasetSpec,
    task_name: str,
    method: str,
    objective_id: int,
    objective: methods.ObjectiveSpec,
) -> None:
    target = objective.target
    seqio.TaskRegistry.add(
        task_name,
        source=seqio.FunctionDataSource(
            dataset_fn=functools.partial(_dataset_fn, key=(spec.name, method, objective_id)),
            splits=_source_splits(spec),
        ),
        preprocessors=[truncate_text, tokenize_text, seqio.preprocessors.append_eos_after_trim],
        output_features=_output_features(spec.vocabulary),
        postprocess_fn=postprocess_cot if target.chain_of_thought else postprocess_label,
        metric_fns=[metrics.METRICS[spec.metric].metric_fn] if target.scored else [],
        shuffle_buffer_size=10_000,
    )
    _NAMES[task_name] = (spec.name, method)


def _method_names(spec: DatasetSpec, method: methods.TrainingMethod) -> list[str]:
    """The mixture or task name of `method` on the dataset, then its sub-task names."""
    name = f"{spec.name}_{method.name}"
    if not method.mixture:
        return [name]
    return [name] + [f"{name}_{_slug(o.name)}" for o in method.bind(spec.teachers)]


def _register_method(spec: DatasetSpec, method: methods.TrainingMethod) -> str:
    """Registers `<dataset>_<method>` (replacing what was registered under its names)."""
    names = _method_names(spec, method)
    for n in names:
        _remove(n)
    if not method.mixture:
        _register_task(spec, names[0], method.name, 0, method.bind(spec.teachers)[0])
        return names[0]
    sub_tasks = []
    for objective_id, (task_name, objective) in enumerate(
        zip(names[1:], method.bind(spec.teachers), strict=True)
    ):
        _register_task(spec, task_name, method.name, objective_id, objective)
        sub_tasks.append((task_name, functools.partial(_mixing_rate, objective.name)))
    seqio.MixtureRegistry.add(names[0], sub_tasks)
    _NAMES[names[0]] = (spec.name, method.name)
    return names[0]


def register_training_method(
    method: methods.TrainingMethod, *, overwrite: bool = False
) -> list[str]:
    """Adds a training method to the table (data/methods.py) and registers it for every dataset
    registered so far (datasets registered later get it too); returns the registered names."""
    if method.name in methods.TRAINING_METHODS:
        if not overwrite:
            raise ValueError(f"training method {method.name!r} is already in the table")
        remove_training_method(method.name)
    methods.TRAINING_METHODS[method.name] = method
    return [_register_method(spec, method) for spec in _DATASETS.values()]


def remove_training_method(name: str) -> None:
    """Takes a training method out of the table and its tasks and mixtures out of SeqIO."""
    method = methods.get_training_method(name)
    for spec in _DATASETS.values():
        for n in _method_names(spec, method):
            _remove(n)
            _NAMES.pop(n, None)
    del methods.TRAINING_METHODS[name]


def _remove(name: str) -> None:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)


def _jsonl_loader(
    name: str, paths: Mapping[str, str], formatter: Callable[[dict], str] | None
) -> Callable[[str], list[Record]]:
    def load(split: str) -> list[Record]:
        path = options.resolve_path(paths[split])
        records = read_jsonl(path)
        for r in records:
            if not r.input:
                if formatter is None:
                    raise RecordError(
                        f"{path}: record {r.id!r} has 'fields' but no 'input', and dataset "
                        f"{name!r} was registered without a formatter"
                    )
                r.input = formatter(r.fields or {})
                if not r.input:
                    raise RecordError(f"{path}: the formatter gave an empty input for {r.id!r}")
        return records

    return load


def _dss_loader(
    name: str, directory: str, teacher: str, row_formatter: dss.RowFormatter | None
) -> Callable[[str], list[Record]]:
    def load(split: str) -> list[Record]:
        records, _ = dss.read_dss_split(
            options.resolve_path(directory), name, split, teacher=teacher, formatter=row_formatter
        )
        return records

    return load


def register_dataset(
    name: str,
    *,
    jsonl: Mapping[str, str] | None = None,
    dss_dir: str | None = None,
    loader: Callable[[str], list[Record]] | None = None,
    splits: Sequence[str] | None = None,
    metric: str = "accuracy",
    vocabulary: seqio.Vocabulary | None = None,
    teachers: Sequence[str] = ("palm",),
    formatter: Callable[[dict], str] | None = None,
    row_formatter: dss.RowFormatter | None = None,
    eval_split: str = "test",
    overwrite: bool = True,
) -> list[str]:
    """Registers `<name>_<method>` for every method; returns the registered names.

    Exactly one source: `jsonl` ({split: path} of record files), `dss_dir` (a directory in the DSS
    release layout, files `<name>_<split>.json` and `llm/`), or `loader` (split -> records).
    Relative paths are taken under the data directory (DatasetOptions.data_dir or
    $DISTILL_SBS_DATA_DIR) when the dataset is built. `metric` is one of distill_sbs.metrics.METRICS
    ("accuracy", "multiple_choice", "equation", "numeric"). `vocabulary` defaults to T5's.
    `teachers` names the teachers in the records (TinyLLM gets one objective each).
    `formatter(fields) -> input` builds inputs of JSONL records given as "fields";
    `row_formatter(row, where) -> (input, label, choices)` reads rows of an unknown DSS layout
    (default: by field names, see dss.detect_format).
    """
    if not re.fullmatch(r"[\w.]+", name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '_' or '.'")
    sources = [s is not None for s in (jsonl, dss_dir, loader)]
    if sum(sources) != 1:
        raise ValueError("register_dataset needs exactly one of jsonl=, dss_dir=, loader=")
    if metric not in metrics.METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(metrics.METRICS)}")
    if not teachers:
        raise ValueError("register_dataset needs at least one teacher name")
    if jsonl is not None:
        splits = tuple(splits or jsonl)
        missing = [s for s in splits if s not in jsonl]
        if missing:
            raise ValueError(f"jsonl= has no path for split(s) {missing}")
        load = _jsonl_loader(name, dict(jsonl), formatter)
    elif dss_dir is not None:
        splits = tuple(splits or ("train", "test"))
        load = _dss_loader(name, dss_dir, teachers[0], row_formatter)
    else:
        splits = tuple(splits or ("train", "test"))
        load = loader
    if eval_split not in splits:
        raise ValueError(f"eval_split {eval_split!r} is not one of the splits {splits}")
    if vocabulary is None:
        from distill_sbs.data.vocab import t5_vocabulary

        vocabulary = t5_vocabulary()
    spec = DatasetSpec(name, load, splits, metric, vocabulary, tuple(teachers), eval_split)
    if name in _DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered")
    _DATASETS[name] = spec
    for key in [k for k in _CACHE if k[0] == name]:
        del _CACHE[key]

    return [_register_method(spec, method) for method in methods.TRAINING_METHODS.values()]


def get_dataset(
    mixture_or_task_name: str,
    *,
    task_feature_lengths: Mapping[str, int],
    split: str,
    batch_size: int,
    shuffle: bool = True,
    seed: int | None = None,
    pack: bool = True,
    shard_id: int = 0,
    num_shards: int = 1,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Batched model features (see ObjectiveEncDecFeatureConverter) of one host's shard.

    Deterministic for a given seed: a resumed run gets the same stream and can skip to its
    position. `batch_size` is per host; the last partial batch is dropped when repeating.

    Sharding is by rows of the global batch: every host builds the same stream of global batches
    (`batch_size * num_shards` rows) and keeps rows [shard_id * batch_size, (shard_id + 1) *
    batch_size). The hosts' rows are disjoint and together are exactly the one-host batch, so a
    run's numbers do not depend on how many hosts it spans (and it resumes on another count).
    The price is that each host tokenises and packs the whole stream, cheap next to a train step.
    With several shards a final partial global batch is dropped, so all hosts take as many steps.
    """
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
    if set(task_feature_lengths) != {"inputs", "targets"}:
        raise ValueError(
            "task_feature_lengths must have keys 'inputs' and 'targets', "
            f"got {task_feature_lengths}"
        )
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    extra = {}
    if isinstance(provider, seqio.Mixture):  # it keeps only its output features unless told
        passthrough = [topk.EXAMPLE_IDS, topk.EXAMPLE_LOGPROBS] if topk.teacher_topk_path() else []
        if cross_tokenizer.teacher_pieces_path():
            passthrough.append(PIECES_EXAMPLE_FEATURE)
        if passthrough:
            extra["passthrough_features"] = passthrough
    ds = provider.get_dataset(
        sequence_length=dict(task_feature_lengths),
        split=split,
        use_cached=False,
        shuffle=shuffle,
        seed=seed,
        num_epochs=None if repeat else 1,
        trim_output_features=True,
        **extra,
    )
    ds = ObjectiveEncDecFeatureConverter(pack=pack)(ds, dict(task_feature_lengths))
    ds = ds.batch(batch_size * num_shards, drop_remainder=repeat or num_shards > 1)
    if num_shards > 1:
        rows = slice(shard_id * batch_size, (shard_id + 1) * batch_size)
        ds = ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})
    opts = tf.data.Options()
    opts.deterministic = True
    return ds.with_options(opts).prefetch(tf.data.AUTOTUNE)
