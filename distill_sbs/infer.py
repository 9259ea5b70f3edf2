"""Write JSONL predictions of a checkpoint, T5X style: `infer()` (gin-configurable) and `main`.

    python -m distill_sbs.infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \
        --gin.MIXTURE_OR_TASK_NAME="'arith_dss'" --gin.OUTPUT_FILE="'/tmp/preds.jsonl'"
    python -m distill_sbs.infer --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH="'/tmp/run'" \
        --gin.INPUT_FILE="'questions.jsonl'" --gin.RATIONALE=True --gin.OUTPUT_FILE="'/tmp/p.jsonl'"

An input file has one JSON object per line with an "input" string (and optionally "id").
Each output line: {"id", "input", "prediction"[, "target"][, "rationale"]}. Inputs of a file get
LABEL_PREFIX ("[label] ", what DSS students were trained with; "" for other students); a task's
inputs are used as the task built them. With RATIONALE=True the rationale is generated from
"[rationale] " + the input (without its label prefix). `read_inputs` and `task_inputs` read them.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python -m distill_sbs.infer` runs this file as __main__; hand over to the package's copy of
    # the module so that gin registers its configurables once (not also as __main__.*).
    from distill_sbs.infer import main as _main

    _main()
    raise SystemExit(0)

import json
from collections.abc import Mapping
from typing import IO, Any

import gin

from distill_sbs import cli, storage
from distill_sbs.errors import UserError


def read_inputs(path: str) -> list[dict[str, Any]]:
    """Rows {"id", "input"} of a JSONL file; a bad line raises naming file:line."""
    from distill_sbs.data.records import RecordError, iter_json_lines

    rows = []
    for obj, where in iter_json_lines(path, "an input line"):
        if not isinstance(obj.get("input"), str):
            raise RecordError(f"{where}: expected an object with a string field 'input'")
        lineno = where.rsplit(":", 1)[1]
        rows.append(
            {"id": obj.get("id", f"{storage.Path(path).name}-{lineno}"), "input": obj["input"]}
        )
    return rows


def task_inputs(mixture_or_task_name: str, split: str) -> list[dict[str, Any]]:
    """Rows {"id", "input", "target"} of the scored (label) task of a name; "input" is exactly
    what the task feeds the model (with its prefix, if any)."""
    import seqio

    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    scored = [t for t in tasks if t.metric_fns and split in t.splits] or tasks
    rows = []
    for ex in scored[0].source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
        row = {"input": ex["inputs"].decode("utf-8"), "target": ex["targets"].decode("utf-8")}
        row["id"] = ex["id"].decode("utf-8") if "id" in ex else str(len(rows))
        rows.append(row)
    return rows


def open_output(output_file: str) -> IO[str]:
    """OUTPUT_FILE opened for writing (its folder made); a path that cannot be written is a
    UserError."""
    path = storage.Path(output_file)
    try:
        storage.makedirs(path.parent)
        return path.open("w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"OUTPUT_FILE={output_file}: cannot be written ({e})") from e


@gin.configurable
def infer(
    checkpoint_path: str = gin.REQUIRED,
    output_file: str = gin.REQUIRED,
    mixture_or_task_name: str | None = None,
    split: str = "test",
    input_file: str | None = None,
    input_length: int = 512,
    max_decode_length: int = 128,
    rationale_decode_length: int = 256,
    batch_size: int = 32,
    rationale: bool = False,
    label_prefix: str = "[label] ",
    rationale_prefix: str = "[rationale] ",
    method: str = "greedy",
    num_beams: int = 4,
    seed: int = 0,
    generate_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Predicts a label (and a rationale when asked) for each input; writes JSONL rows.

    method "sample" draws with `seed` (each batch from its own key, so reruns agree)."""
    import jax

    from distill_sbs import models
    from distill_sbs.eval import check_vocabulary
    from distill_sbs.generation import generate_texts

    if (input_file is None) == (mixture_or_task_name is None):
        raise UserError("infer: give exactly one of INPUT_FILE or MIXTURE_OR_TASK_NAME")
    with open_output(output_file) as out:  # before any work: a bad path fails at once
        if input_file:
            rows = read_inputs(input_file)
            label_inputs = [label_prefix + r["input"] for r in rows]
            raw_inputs = [r["input"] for r in rows]
        else:  # the task's own inputs, prefix included; the rationale swaps the label prefix
            rows = task_inputs(mixture_or_task_name, split)
            label_inputs = [r["input"] for r in rows]
            raw_inputs = [
                t[len(label_prefix) :] if label_prefix and t.startswith(label_prefix) else t
                for t in label_inputs
            ]
        model, params = models.load(checkpoint_path)
        if mixture_or_task_name:
            check_vocabulary(model, mixture_or_task_name, checkpoint_path)
        elif model.vocabulary is None:
            raise UserError(f"{checkpoint_path}: the checkpoint has no vocabulary (spiece.model)")
        kwargs = dict(generate_kwargs or {}, method=method)
        if method == "beam":
            kwargs["num_beams"] = num_beams
        if method == "sample":  # each batch draws with SEED folded with its first row
            kwargs["rng"] = jax.random.PRNGKey(seed)

        def run(texts: list[str], length: int) -> list[str]:
            enc = model.encode_texts(texts, input_length)
            return generate_texts(
                model, params, enc, batch_size=batch_size, max_decode_length=length, **kwargs
            )

        for row, text in zip(rows, run(label_inputs, max_decode_length), strict=True):
            row["prediction"] = text
        if rationale:
            texts = [rationale_prefix + t for t in raw_inputs]
            for row, text in zip(rows, run(texts, rationale_decode_length), strict=True):
                row["rationale"] = text
        out.write("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} predictions to {output_file}")
    return rows


def main() -> None:
    cli.run(lambda: infer())
