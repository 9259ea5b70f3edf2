"""Vocabularies: T5 SentencePiece (path resolved lazily) and the embedded dataset's small one."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence

import seqio

from distill_sbs import storage
from distill_sbs.data import options

ASSETS_DIR = os.path.join(os.path.dirname(__file__), "assets")
ARITH_SPM = storage.join(ASSETS_DIR, "arith_spm.model")


class LazySentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A SentencePieceVocabulary whose file path is looked up on first use, not at construction.

    Task registration happens at import time, before gin bindings or the environment of a run are
    in force; the path function runs when the vocabulary is first used.
    """

    def __init__(self, path_fn: Callable[[], str], extra_ids: int = 0):
        self._path_fn = path_fn
        self._resolved_path: str | None = None
        super().__init__("<resolved on first use>", extra_ids=extra_ids)

    @property
    def _sentencepiece_model_file(self) -> str:  # read by seqio when it loads the model
        if self._resolved_path is None:
            self._resolved_path = self._path_fn()
        return self._resolved_path

    @_sentencepiece_model_file.setter
    def _sentencepiece_model_file(self, value: str) -> None:
        del value  # the constructor's placeholder; the path comes from path_fn

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_resolved_path", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._resolved_path = None

    def _comparable_state(self) -> dict:
        """The state a plain SentencePieceVocabulary of the resolved file would have."""
        state = {k: v for k, v in self.__getstate__().items() if k != "_path_fn"}
        state["_sentencepiece_model_file"] = self._sentencepiece_model_file
        return state

    # T5X compares model and task vocabularies with == and !=: equal to seqio's own vocabulary
    # of the same file. (Python asks the subclass first, whichever side it is on.)
    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazySentencePieceVocabulary):
            return self._comparable_state() == other._comparable_state()
        if isinstance(other, seqio.SentencePieceVocabulary):
            return self._comparable_state() == other.__getstate__()
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # as seqio's vocabularies (mutable state, equality by value)


@functools.cache
def t5_vocabulary() -> seqio.SentencePieceVocabulary:
    """T5's SentencePiece vocabulary with 100 extra ids (32,100 ids); path from DatasetOptions."""
    # seqio reads the model through tf.io.gfile: a remote file (gs://) is read once through the
    # storage layer into a local copy instead.
    return LazySentencePieceVocabulary(
        lambda: storage.local_file(options.t5_vocab_path()), extra_ids=100
    )


@functools.cache
def arith_vocabulary() -> seqio.SentencePieceVocabulary:
    """The small vocabulary shipped for the embedded dataset `arith` (no extra ids)."""
    if not storage.exists(ARITH_SPM):
        raise FileNotFoundError(
            f"{ARITH_SPM} is missing; build it with `python -m distill_sbs.data.build_assets`"
        )
    return seqio.SentencePieceVocabulary(ARITH_SPM, extra_ids=0)


def train_bpe_model(
    texts: Iterable[str], vocab_size: int, user_defined_symbols: Sequence[str] = ()
) -> bytes:
    """A SentencePiece BPE model (serialised) of the embedded datasets' vocabularies: T5's special
    ids (pad 0, eos 1, unk 2, no bos), no normalisation, digits split, and deterministic (one
    thread, the texts in order) so that a rebuild gives the shipped file byte for byte.
    vocab_size is an upper bound (hard_vocab_limit=False); user_defined_symbols are always one
    piece each, wherever they occur."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        character_coverage=1.0,
        split_digits=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        user_defined_symbols=list(user_defined_symbols),
    )
    return model.getvalue()
