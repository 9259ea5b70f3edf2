"""SeqIO data layer: records, teacher-output parsing, DSS reader, tasks, mixtures, batches.

import distill_sbs.tasks                       # registers the built-in datasets
ds = distill_sbs.data.get_dataset("cqa_dss", task_feature_lengths={"inputs": 512,
                                  "targets": 256}, split="train", batch_size=64, seed=0)
distill_sbs.data.get_objectives("cqa_dss")     # [Objective("label", 0.5), ...]

The names from registry, feature_converter and vocab import on first use: they bring in
TensorFlow and SeqIO (seconds), which the records and the method table (paper.py's grid, the
launchers, the teachers) do not need.
"""

import importlib

from distill_sbs.data.methods import TRAINING_METHODS, ObjectiveSpec, TrainingMethod
from distill_sbs.data.options import DatasetOptions, data_dir, get_options
from distill_sbs.data.records import (
    Record,
    RecordError,
    TeacherSample,
    read_jsonl,
    record_from_json,
    record_to_json,
    write_jsonl,
)
from distill_sbs.parsing import ParsedOutput, normalize_choice_answer, parse_chain_of_thought

_LAZY = {
    "OBJECTIVE_FEATURE": "feature_converter",
    "ObjectiveEncDecFeatureConverter": "feature_converter",
    "Objective": "registry",
    "build_examples": "registry",
    "clear_cache": "registry",
    "get_dataset": "registry",
    "get_dataset_spec": "registry",
    "get_objectives": "registry",
    "load_records": "registry",
    "register_dataset": "registry",
    "register_training_method": "registry",
    "registered_datasets": "registry",
    "remove_training_method": "registry",
    "arith_vocabulary": "vocab",
    "t5_vocabulary": "vocab",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "DatasetOptions",
    "ObjectiveSpec",
    "ParsedOutput",
    "Record",
    "RecordError",
    "TRAINING_METHODS",
    "TeacherSample",
    "TrainingMethod",
    "data_dir",
    "get_options",
    "normalize_choice_answer",
    "parse_chain_of_thought",
    "read_jsonl",
    "record_from_json",
    "record_to_json",
    "write_jsonl",
    *_LAZY,
]
