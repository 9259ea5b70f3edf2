"""Builds distill_sbs/data/assets/arith_spm.model: `python -m distill_sbs.data.build_assets`.

A small SentencePiece model trained on the generated embedded dataset `arith` (every text a task
can produce: inputs with their prefixes, labels, rationales, Fine-tune-CoT targets), with T5's
special ids (pad 0, eos 1, unk 2, no bos) so that the quickstart's tiny T5 uses the same
conventions.
"""

from __future__ import annotations

from distill_sbs import program, storage
from distill_sbs.data import arith, preprocessors
from distill_sbs.data.vocab import ARITH_SPM, train_bpe_model

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
    storage.write_bytes(path, train_bpe_model(corpus(), vocab_size))


def define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("output", ARITH_SPM, "where to write the SentencePiece model")
    flags.DEFINE_integer("vocab_size", VOCAB_SIZE, "upper bound on the number of pieces")


def main() -> None:
    import sentencepiece as spm
    from absl import flags

    output = flags.FLAGS.output
    build(output, flags.FLAGS.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=output)
    print(f"wrote {output}: {sp.get_piece_size()} pieces")


if __name__ == "__main__":
    program.run(main, define_flags)
