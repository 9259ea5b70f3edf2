r"""Save a local teacher's top-k log-probabilities for offline logit distillation:

    python -m distill_sbs.annotate_topk --teacher=/ckpt/teacher --task=arith_dss --k=8 \
        --output=/data/arith_dss.train.topk.npz

scores every target token of the task's (or mixture's) split by teacher forcing, exactly as
training tokenizes it, and writes data/topk.py's file; then train with
`teacher_topk_path.path = "<output>"` and `train.kd = @KD()` without `KD.teacher`
(docs/distillation.md). --teacher is a native checkpoint, a MODEL_DIR or a Hugging Face T5 folder.
"""

from __future__ import annotations

import importlib

from absl import app, flags

_TEACHER = flags.DEFINE_string("teacher", None, "Teacher checkpoint (native, MODEL_DIR or HF).")
_TASK = flags.DEFINE_string("task", None, "Registered task or mixture, e.g. arith_dss.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to score.")
_K = flags.DEFINE_integer("k", 8, "Log-probabilities kept per target token.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz file.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per teacher batch.")
_MODULE = flags.DEFINE_string("module", None, "Module to import that registers --task.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for name, flag in (("teacher", _TEACHER), ("task", _TASK), ("output", _OUTPUT)):
        if not flag.value:
            raise app.UsageError(f"--{name} is required")
    from distill_sbs import distillation, models

    importlib.import_module(_MODULE.value or "distill_sbs.tasks")
    model, params = models.load(_TEACHER.value)
    size = distillation.write_topk(
        model, params, _TASK.value, _OUTPUT.value, k=_K.value, split=_SPLIT.value,
        batch_size=_BATCH.value,
    )  # fmt: skip
    print(f"wrote {_OUTPUT.value}: top-{_K.value}, {size:.1f} bytes per target token")


if __name__ == "__main__":
    app.run(main)
