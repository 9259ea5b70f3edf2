"""gin-configurable knobs of the data layer, read when a dataset is built (never at registration).

gin files `import distill_sbs.tasks` at parse time, before their bindings apply, so every value
here is looked up through `get_options()` at call time, e.g. in a gin file:

    DatasetOptions.data_dir = "/data/dss"
    DatasetOptions.train_fraction = 0.125
    DatasetOptions.dss_alpha = 0.5
"""

from __future__ import annotations

import dataclasses
import os

import gin

from distill_sbs import storage
from distill_sbs.errors import UserError

DATA_DIR_ENV = "DISTILL_SBS_DATA_DIR"
VOCAB_ENV = "DISTILL_SBS_VOCAB"
# T5's SentencePiece model (Apache-2.0), shipped so that no T5 task reads gs://t5-data offline; the
# same file as gs://t5-data/vocabs/cc_all.32000/sentencepiece.model.
DEFAULT_T5_VOCAB = os.path.join(os.path.dirname(__file__), "assets", "t5_spiece.model")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetOptions:
    """Data options; every field has a gin binding `DatasetOptions.<field>`.

    data_dir: root of the data files (default: $DISTILL_SBS_DATA_DIR).
    vocab_path: T5 SentencePiece model of the built-in DSS datasets (default: $DISTILL_SBS_VOCAB,
      else the copy of T5's vocabulary shipped in distill_sbs/data/assets).
    train_fraction, subsample_seed: keep this fraction of the train split (0 < f <= 1), chosen by
      a seeded permutation so that smaller fractions are subsets of larger ones.
    dss_alpha: DSS weight of the label objective; the rationale objective gets 1 - alpha.
    label_weight: TinyLLM weight of the label objective.
    teacher_weights: TinyLLM weight per teacher name; teachers not listed get teacher_weight.
    mixing_rates: SeqIO mixing rate per objective name ("label", "rationale", "rationale:<t>");
      objectives not listed get rate 1.0.
    cot_filter_correct: Fine-tune-CoT keeps only teacher samples whose answer is right (the count
      dropped is logged); samples of records without a gold label are dropped too when set.
    validation_fraction, validation_seed: for a dataset registered without a "validation" split,
      hold out this fraction of train as one (0: none): the first ceil(fraction * n) records of a
      permutation seeded by validation_seed; train keeps the rest, before train_fraction applies.
    """

    data_dir: str | None = None
    vocab_path: str | None = None
    train_fraction: float = 1.0
    subsample_seed: int = 0
    dss_alpha: float = 0.5
    label_weight: float = 1.0
    teacher_weights: dict | None = None
    teacher_weight: float = 0.5
    mixing_rates: dict | None = None
    cot_filter_correct: bool = True
    validation_fraction: float = 0.0
    validation_seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"DatasetOptions.train_fraction={self.train_fraction} not in (0, 1]")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"DatasetOptions.validation_fraction={self.validation_fraction} not in [0, 1)"
            )
        if not 0.0 <= self.dss_alpha <= 1.0:
            raise ValueError(f"DatasetOptions.dss_alpha={self.dss_alpha} not in [0, 1]")


def get_options() -> DatasetOptions:
    """The options with the gin bindings in force now."""
    return DatasetOptions()


def data_dir() -> str:
    """The data directory: gin DatasetOptions.data_dir, else $DISTILL_SBS_DATA_DIR."""
    path = get_options().data_dir or os.environ.get(DATA_DIR_ENV)
    if not path:
        raise UserError(
            f"no data directory: set the environment variable {DATA_DIR_ENV} or the gin binding "
            "DatasetOptions.data_dir"
        )
    return path


def resolve_path(path: str) -> str:
    """An absolute path (or URL) unchanged; a relative one under data_dir()."""
    if storage.is_remote(path) or storage.Path(path).is_absolute():
        return path
    return storage.join(data_dir(), path)


def t5_vocab_path() -> str:
    return get_options().vocab_path or os.environ.get(VOCAB_ENV) or DEFAULT_T5_VOCAB
