"""DSS + cross-tokenizer KD (span, ULD) vs DSS on the embedded `arith` data, from a teacher of
ANOTHER vocabulary, 3 seeds (docs/distillation.md, "Experiment: a teacher with another tokenizer").

benchmarks/kd_arith.py's experiment with the teacher's vocabulary changed, reusing its flags and
helpers (a run whose MODEL_DIR has final metrics is kept, so an interrupted run resumes):

1. a SentencePiece BPE of up to --teacher_vocab pieces trained on the arith texts (the
   student's has 256): 512 gives 449 pieces (the corpus fills no more), 207 of the student's ids
   naming the same piece and every target cut into the same pieces; 128 cuts most animal names
   into two to four pieces. The dataset `arith_gold_bpe<N>` is registered over it: arith's
   records with each LLM teacher's rationale replaced by the record's gold rationale (the
   students never see those; about 12% of the LLM rationales are wrong);
2. the teacher of gin/kd/arith_xt_teacher.gin trained on `arith_gold_bpe<N>_dss` (in this
   process: the task is registered here), then scored on test;
3. its top-k pieces file of `arith_dss`'s train split, written through `distill_sbs.serve`'s
   scoring endpoint (teachers.topk.write_pieces_from_server): the teacher's own pieces, spans
   and log-probs of each target text;
4. per seed, the students of gin/kd/arith_student.gin: DSS, and DSS + KD from that file with
   `KD.cross_tokenizer` "span" and "uld" (gin/kd/arith_kd_pieces.gin), each in its own process
   (the DSS students do not depend on the teacher: copy them between out_dirs to skip them).

    nice -n 15 python benchmarks/kd_arith_xt.py --out_dir=/tmp/kd_arith_xt --seeds=0,1,2
    nice -n 15 python benchmarks/kd_arith_xt.py --out_dir=/tmp/kd_arith_xt128 --teacher_vocab=128
    nice -n 15 python benchmarks/kd_arith_xt.py --out_dir=/tmp/kd_arith_xt128n2000 \
        --teacher_vocab=128 --teacher_problems=2000
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kd_arith  # noqa: E402  (its flags: --out_dir, --seeds, --json, --k, --gamma)

_STEPS = flags.DEFINE_integer("student_steps", None, "students' TRAIN_STEPS (default: the gin's)")
_PROBLEMS = flags.DEFINE_integer(
    "teacher_problems", 400, "train problems of the teacher (the students': the first 400)"
)
_VOCAB = flags.DEFINE_integer(
    "teacher_vocab", 512, "the teacher's BPE size (an upper bound) and T5Config.vocab_size"
)
KEY_ENV = "KD_ARITH_XT_KEY"  # the in-process server's key, only for this run

METHODS = {"DSS": None, "DSS + span KD": "span", "DSS + ULD KD": "uld"}


def gold_rationale_records(split: str) -> list:
    """arith's records of `split`, every LLM teacher's sample replaced by the gold rationale;
    with --teacher_problems > 400, train holds that many problems (the students' 400 first, no
    test input among them)."""
    from distill_sbs.data import arith
    from distill_sbs.data.records import TeacherSample

    records = arith.generate(split)
    if split == "train" and _PROBLEMS.value > len(records):
        test = {r.input for r in arith.generate("test")}
        more = arith.generate("train", n=_PROBLEMS.value + len(test))
        assert [r.input for r in more[: len(records)]] == [r.input for r in records]
        records = [r for r in more if r.input not in test][: _PROBLEMS.value]
    out = []
    for r in records:
        gold = r.fields["gold_rationale"]
        sample = TeacherSample(gold, r.label, f"{gold} So the answer is {r.label}.")
        out.append(dataclasses.replace(r, teachers={t: [sample] for t in r.teachers}))
    return out


def _dataset() -> str:
    more = f"_n{_PROBLEMS.value}" if _PROBLEMS.value != 400 else ""
    return f"arith_gold{more}_bpe{_VOCAB.value}"


def register_teacher_dataset(out: str) -> str:
    """Writes the teacher's vocabulary (once) and registers `arith_gold_bpe<N>_*` over it (gold
    rationales); the vocabulary's path."""
    import seqio

    from distill_sbs.data import arith, register_dataset
    from distill_sbs.data.build_assets import corpus
    from distill_sbs.data.vocab import train_bpe_model

    path = os.path.join(out, f"arith_bpe{_VOCAB.value}.model")
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        with open(path, "wb") as f:
            f.write(train_bpe_model(corpus(), _VOCAB.value))
    vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=0)
    register_dataset(_dataset(), loader=gold_rationale_records, splits=tuple(arith.SIZES),
                     metric="numeric", vocabulary=vocabulary, teachers=arith.TEACHERS)  # fmt: skip
    return path


def _teacher(out: str) -> tuple[str, dict]:
    """(MODEL_DIR, test accuracy and seconds) of gin/kd/arith_xt_teacher.gin, trained here."""
    import gin

    from distill_sbs import cli, train

    model_dir = os.path.join(out, "teacher")
    path = os.path.join(model_dir, "final_metrics.json")
    cost_path = os.path.join(model_dir, "cost.json")
    if not os.path.exists(path):
        t0 = time.time()
        gin.clear_config()
        bindings = [f"MODEL_DIR = '{model_dir}'", f"T5Config.vocab_size = {_VOCAB.value}"]
        bindings.append(f"MIXTURE_OR_TASK_NAME = '{_dataset()}_dss'")
        cli.parse_gin(["kd/arith_xt_teacher.gin"], bindings)
        train.train()
        gin.clear_config()
        with open(cost_path, "w") as f:
            json.dump({"seconds": round(time.time() - t0, 1)}, f)
    with open(path) as f:
        final = json.load(f)
    with open(cost_path) as f:
        return model_dir, {"test": kd_arith._accuracy(final), **json.load(f)}


def _pieces(teacher: str, out: str) -> tuple[str, dict]:
    """The teacher's top-k pieces file of arith_dss's train split, through our server."""
    import secrets

    import distill_sbs
    from distill_sbs.generation import ModelGenerator
    from distill_sbs.serve import Server
    from distill_sbs.teachers.backends import HTTPConfig
    from distill_sbs.teachers.topk import write_pieces_from_server

    path = os.path.join(out, f"arith_dss.train.top{kd_arith._K.value}.pieces.jsonl")
    if os.path.exists(path):
        return path, {}
    t0 = time.time()
    key = secrets.token_hex(16)
    os.environ[KEY_ENV] = key
    gen = ModelGenerator(*distill_sbs.load(teacher), max_input_length=128, max_batch_size=32)
    with Server(gen, api_key=key, model_name="teacher") as server:
        config = HTTPConfig(server.base_url, "teacher", api_key_env=KEY_ENV, max_concurrency=1)
        n = write_pieces_from_server(config, "arith_dss", path, k=kd_arith._K.value, batch_size=32)
    cost = {"entries": n, "bytes": os.path.getsize(path), "seconds": round(time.time() - t0, 1)}
    print(f"pieces file: {cost}", flush=True)
    return path, cost


def main(argv: list[str]) -> None:
    del argv
    import distill_sbs.tasks  # noqa: F401  (arith_dss)

    out = kd_arith._OUT.value
    register_teacher_dataset(out)
    teacher, t = _teacher(out)
    print(f"teacher: {t}", flush=True)
    pieces, pieces_cost = _pieces(teacher, out)
    gamma = kd_arith._GAMMA.value
    results = {"teacher": t["test"], "teacher_model": kd_arith._describe(teacher)}
    results.update({"teacher_vocab": _VOCAB.value, "teacher_problems": _PROBLEMS.value})
    results.update({"gamma": gamma, "k": kd_arith._K.value})
    results.update({"teacher_runs": t, "pieces": pieces_cost, "student_steps": _STEPS.value})
    results.update({"students": {}, "costs": {}})
    for seed in kd_arith._SEEDS.value:
        for name, loss in METHODS.items():
            tag = name.replace(" ", "").replace("+", "_")
            bindings = {"SEED": seed, "MIXTURE_OR_TASK_NAME": "'arith_dss'"}
            if _STEPS.value:
                bindings["TRAIN_STEPS"] = str(_STEPS.value)
            extra = []
            if loss:
                extra = ["kd/arith_kd_pieces.gin"]
                bindings.update({"PIECES_FILE": f"'{pieces}'", "KD.cross_tokenizer": f"'{loss}'"})
                bindings["KD.weights"] = f"{{'label': {gamma}, 'rationale': {gamma}}}"
            model_dir = os.path.join(out, f"{tag}_seed{seed}")
            final = kd_arith._train(["kd/arith_student.gin", *extra], model_dir, bindings)
            acc = kd_arith._accuracy(final)
            results["students"].setdefault(name, []).append(acc)
            results["costs"].setdefault(name, []).append(
                {k: final.get(k) for k in ("seconds", "load_1min")}
            )
            print(f"{name} seed {seed}: accuracy {acc:.2f} ({final.get('seconds')} s)", flush=True)
            with open(kd_arith._JSON.value or os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
    kd_arith._print_table(results)


if __name__ == "__main__":
    app.run(main)
