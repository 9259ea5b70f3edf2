"""Cloze recall of the embedded world's facts: does a (pretrained) student know its world?

    python -m distill_sbs.cloze --checkpoint=/tmp/distill_sbs_world_pretrain [--output=r.json]

For each probe of distill_sbs.data.world.cloze_probes() ("The dufa lives in the <extra_id_0>.")
every value of the attribute is scored as the span-corruption target "<extra_id_0> desert
<extra_id_1>" (teacher-forced log-likelihood, EOS included); the best is the student's answer.
A fact question ("Where does the dufa live?", the pretraining's `world_facts`) scores instead
the answer sentence in the corpus's first phrasing with each value ("The dufa lives in the
desert."). Recall is the fraction right, per phrasing (from the corpus / held out of it /
question), group (entities seen in labelled train / only in the corpus) and attribute, beside
chance (1 / number of values) and the share of the attribute's most common value (what a
student that knows only value frequencies gets).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import flags

from distill_sbs import program, storage
from distill_sbs.data import world
from distill_sbs.errors import UserError


def _pad(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def score_pairs(
    model: Any, params: Any, inputs: Sequence[str], targets: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Teacher-forced log-likelihood of each target (with EOS) given its input (with EOS)."""
    vocab = model.vocabulary
    eos = vocab.eos_id
    enc = [vocab.encode(t) + [eos] for t in inputs]
    dec = [vocab.encode(t) + [eos] for t in targets]
    in_len, out_len = max(map(len, enc)), max(map(len, dec))

    @jax.jit
    def loglik(p, x, y):
        shifted = jax.numpy.pad(y[:, :-1], ((0, 0), (1, 0)))  # decoder inputs start at 0
        logits = model.logits(p, x, shifted)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jax.numpy.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return (picked * (y > 0)).sum(-1)

    scores = []
    for start in range(0, len(enc), batch_size):
        x, y = enc[start : start + batch_size], dec[start : start + batch_size]
        n = len(x)
        x = _pad(x + [[eos]] * (batch_size - n), in_len)  # one compiled shape
        y = _pad(y + [[eos]] * (batch_size - n), out_len)
        scores.append(np.asarray(loglik(params, x, y))[:n])
    return np.concatenate(scores)


def cloze_recall(
    model: Any, params: Any, probes: Sequence[world.ClozeProbe] | None = None
) -> dict[str, float]:
    """{"recall/<phrasing>/<group>": %, ".../<attribute>": %, "chance/<attribute>": %,
    "majority/<attribute>": %, "recall": % over all probes}."""
    probes = list(world.cloze_probes() if probes is None else probes)
    inputs = [p.text for p in probes for _ in p.choices]
    targets = [t for p in probes for t in p.targets]
    scores = score_pairs(model, params, inputs, targets)
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    start = 0
    for p in probes:
        right = p.choices[int(np.argmax(scores[start : start + len(p.choices)]))] == p.answer
        start += len(p.choices)
        group = "seen" if p.seen else "unseen"
        for key in ("recall", f"recall/{p.phrasing}/{group}",
                    f"recall/{p.phrasing}/{group}/{p.attribute}"):  # fmt: skip
            hits[key].append(right)
    out = {k: 100.0 * float(np.mean(v)) for k, v in sorted(hits.items())}
    for attribute in sorted({p.attribute for p in probes}):
        answers = collections.Counter(p.answer for p in probes if p.attribute == attribute)
        choices = next(p.choices for p in probes if p.attribute == attribute)
        out[f"chance/{attribute}"] = 100.0 / len(choices)
        out[f"majority/{attribute}"] = 100.0 * max(answers.values()) / sum(answers.values())
    return out


def define_flags() -> None:
    """The program's flags (defined by program.run, never at import)."""
    flags.DEFINE_string("checkpoint", None, "Native checkpoint or MODEL_DIR.", required=True)
    flags.DEFINE_string("output", None, "Also write the figures as JSON here.")


def main() -> None:
    from distill_sbs import models

    path = flags.FLAGS.checkpoint
    if not storage.exists(path):
        raise UserError(f"--checkpoint={path}: no such checkpoint directory")
    model, params = models.load(path)
    if model.vocabulary is None or model.vocabulary.vocab_size != world.vocabulary().vocab_size:
        raise UserError(f"--checkpoint={path}: not a model over the world's vocabulary")
    results = cloze_recall(model, params)
    for k, v in results.items():
        print(f"{k:40s} {v:6.1f}")
    if flags.FLAGS.output:
        storage.write_json(flags.FLAGS.output, results)


if __name__ == "__main__":
    program.run(main, define_flags)
