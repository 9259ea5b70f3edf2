"""SeqIO data layer: records, teacher-output parsing, DSS reader, tasks, mixtures, batches.

import distill_sbs.tasks                       # registers the built-in datasets
ds = distill_sbs.data.get_dataset("cqa_dss", task_feature_lengths={"inputs": 512,
                                  "targets": 256}, split="train", batch_size=64, seed=0)
distill_sbs.data.get_objectives("cqa_dss")     # [Objective("label", 0.5), ...]
"""

from distill_sbs.data.feature_converter import OBJECTIVE_FEATURE, ObjectiveEncDecFeatureConverter
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
from distill_sbs.data.registry import (
    METHODS,
    Objective,
    build_examples,
    clear_cache,
    get_dataset,
    get_dataset_spec,
    get_objectives,
    load_records,
    register_dataset,
    registered_datasets,
)
from distill_sbs.data.vocab import arith_vocabulary, t5_vocabulary
from distill_sbs.parsing import ParsedOutput, normalize_choice_answer, parse_chain_of_thought

__all__ = [
    "METHODS",
    "OBJECTIVE_FEATURE",
    "DatasetOptions",
    "Objective",
    "ObjectiveEncDecFeatureConverter",
    "ParsedOutput",
    "Record",
    "RecordError",
    "TeacherSample",
    "arith_vocabulary",
    "build_examples",
    "clear_cache",
    "data_dir",
    "get_dataset",
    "get_dataset_spec",
    "get_objectives",
    "get_options",
    "load_records",
    "normalize_choice_answer",
    "parse_chain_of_thought",
    "read_jsonl",
    "record_from_json",
    "record_to_json",
    "register_dataset",
    "registered_datasets",
    "t5_vocabulary",
    "write_jsonl",
]
