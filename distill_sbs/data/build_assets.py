"""Builds distill_sbs/data/assets/arith_spm.model: `python -m distill_sbs.data.build_assets`.

A small SentencePiece model trained on the generated embedded dataset `arith` (every text a task
can produce: inputs with their prefixes, labels, rationales, Fine-tune-CoT targets), with T5's
special ids (pad 0, eos 1, unk 2, no bos) so that the quickstart's tiny T5 uses the same
conventions.
"""

from __future__ import annotations

import argparse
import io

import sentencepiece as spm

from distill_sbs import storage
from distill_sbs.data import arith, preprocessors
from distill_sbs.data.vocab import ARITH_SPM

# An upper bound (hard_vocab_limit=False); the corpus fills it, so most words are single pieces.
VOCAB_SIZE = 256


def corpus() -> list[str]:
    lines = []
    for split in arith.SIZES:
        for r in arith.generate(split):
            prefixes = ["", preprocessors.LABEL_PREFIX, preprocessors.RATIONALE_PREFIX]
            prefixes += [preprocessors.teacher_prefix(t) for t in arith.TEACHERS]
            lines += [p + r.input for p in prefixes]
            lines.append(r.label)
            for samples in r.teachers.values():
                for s in samples:
                    lines.append(s.rationale)
                    lines.append(preprocessors.cot_target(s.rationale, s.label))
    return lines


def build(path: str = ARITH_SPM, vocab_size: int = VOCAB_SIZE) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
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
    )
    storage.write_bytes(path, model.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=ARITH_SPM)
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    build(args.output, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=args.output)
    print(f"wrote {args.output}: {sp.get_piece_size()} pieces")


if __name__ == "__main__":
    main()
