"""DSS training throughput: our jitted train step vs the reference formulation (HF T5, PyTorch).

    DISTILL_SBS_DATA_DIR=../shared/data/dss \\
        python benchmarks/train_benchmark.py --mode both --steps 3 --threads 0 \\
        --json_out /tmp/train_bench.json

Both sides train the t5_1_1 small shape (random init, float32, dropout 0.1 as the T5 1.1
checkpoints the reference fine-tunes) with alpha = 0.5, AdamW lr 5e-5, gradient clipping at 1.0,
in the same process on the same CPU cores (--threads pins the process to that many cores and
gives PyTorch as many threads; XLA sizes its pool from the same affinity mask).

- ours: `distill_sbs.trainer.Trainer.train_step` (one jitted step, donated state, per-objective
  loss of losses.py) on packed batches of our feature converter's layout, each target token
  carrying its objective id: (a) packed in numpy by `distill_sbs.data.batches` (seqio's packing,
  no TensorFlow: mode (a) runs where TensorFlow and seqio are not installed), (b) from SeqIO.
- reference (`_reference_dss.py`): per batch of examples, two forward passes ("predict" rows ->
  label, "explain" rows -> rationale), each part padded to its longest row, backward, AdamW.

Modes:
  (a) fixed shapes: 8 examples per step, inputs 128 tokens, label 8, rationale 64 (random ids).
      Ours packs each example's label and rationale sequences into one row: 8 rows of
      inputs 256 / targets 72, i.e. exactly the reference's tokens with no padding.
  (b) real CQA (`cqa_dss`, the T5 vocabulary): the reference takes 8 shuffled examples per step,
      padded per batch; ours takes packed batches of --pack_rows rows of --pack_lengths from
      `distill_sbs.data.get_dataset("cqa_dss", pack=True)`. Batches are built before timing on
      both sides (the input pipeline's own rate is reported separately).

An "example" is one DSS example, i.e. one reference batch row through both passes: its label
target and its rationale target. Ours counts (label sequences + rationale sequences) / 2 in each
packed batch (the SeqIO mixture samples the two objectives independently at rate 1 : 1).

Each side runs --warmup untimed steps, alternating (ours: compilation; then the shared heap's
one-time growth; reported), then --steps timed steps, ours and the reference alternating in
--rounds blocks so that load changes hit both alike.

Model FLOPs (for MFU; `distill_sbs.flops.sequence_train_flops`, the formula the training log
uses) are counted per sequence from its real (unpadded) lengths, matmuls only:
projections, MLP, logits, and attention scores/values over the sequence's own length (the full
square for causal self-attention, by convention), times 3 for forward + backward. Both sides thus
get the same FLOPs for the same example; padding and packing overheads count as lost utilisation.
The peak is the best of a float32 2048x2048 matmul in JAX and in PyTorch on the same cores.
The process is set up as the launchers set it (distill_sbs.cpu_host): glibc's allocator (both
sides share the process, so both get it; DISTILL_SBS_HOST_MALLOC=system keeps the defaults) and
XLA's CPU compiler flags (ours only; a setting of the same flag in XLA_FLAGS wins).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

# ---- configuration before jax / torch are imported (the thread count is fixed at import) ----
from absl import app, flags  # imports neither jax nor torch


def _define_flags() -> list[Any]:
    """The flags, defined when the script runs (device_check imports this module as a library)."""
    return [
        flags.DEFINE_enum("mode", "both", ["a", "b", "both"], "Which comparison to run."),
        flags.DEFINE_integer("steps", 3, "Timed steps per side and mode."),
        flags.DEFINE_integer("rounds", 3, "Alternate ours/reference in this many blocks."),
        flags.DEFINE_integer(
            "warmup",
            2,
            "Untimed steps per side first, alternating ours/reference (1: compilation; 2: also "
            "the heap growth to what both sides need together, once).",
        ),
        flags.DEFINE_integer(
            "threads",
            1,
            "CPU cores to pin to, both sides (0: all; oversubscribed cores cripple PyTorch).",
        ),
        flags.DEFINE_string("json_out", "", "Write the figures as JSON here."),
        flags.DEFINE_integer("batch", 8, "Examples per reference step."),
        flags.DEFINE_integer("input_length", 128, "(a) input tokens."),
        flags.DEFINE_integer("label_length", 8, "(a) label tokens."),
        flags.DEFINE_integer("rationale_length", 64, "(a) rationale tokens."),
        flags.DEFINE_integer("pack_rows", 4, "(b) rows per packed batch."),
        flags.DEFINE_string(
            "pack_lengths", "256,96", "(b) packed feature lengths 'inputs,targets'."
        ),
        flags.DEFINE_float("dropout", 0.1, "Dropout rate of both sides."),
        flags.DEFINE_float("alpha", 0.5, "DSS label weight."),
        flags.DEFINE_integer("seed", 0, "Seed of the random examples and initialisation."),
    ]


def parse_args(argv: Sequence[str]) -> SimpleNamespace:
    """This benchmark's flags as a namespace; bad flags exit with one usage error."""
    holders = _define_flags()
    app.define_help_flags()
    rest = app.parse_flags_with_usage(list(argv))
    if len(rest) > 1:
        raise SystemExit(f"unexpected arguments {rest[1:]}")
    return SimpleNamespace(**{holder.name: holder.value for holder in holders})


ARGS = parse_args(sys.argv) if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    # Pin before jax/torch start their thread pools, so both see the same cores.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
if ARGS is not None:
    from distill_sbs import cpu_host  # noqa: E402  (both sides: one process, one allocator)

    print(f"CPU host set-up (as the launchers do): {cpu_host.prepare()}")

import _reference_dss as ref  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from distill_sbs import optimizers, partitioning  # noqa: E402
from distill_sbs.data import batches  # noqa: E402
from distill_sbs.flops import sequence_train_flops  # noqa: E402
from distill_sbs.models import EncoderDecoderModel  # noqa: E402
from distill_sbs.network import T5Config  # noqa: E402
from distill_sbs.trainer import Trainer, add_metrics  # noqa: E402

Batch = dict[str, np.ndarray]


# ---- model FLOPs -------------------------------------------------------------------------------


def packed_segments(batch: Batch) -> list[tuple[int, int, int]]:
    """(input length, target length, objective id) of every sequence in a packed batch."""
    out = []
    enc_seg, dec_seg = batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    obj = batch["decoder_objective_ids"]
    for r in range(enc_seg.shape[0]):
        for s in range(1, int(dec_seg[r].max()) + 1):
            dec_mask = dec_seg[r] == s
            li = int(np.sum(enc_seg[r] == s))
            out.append((li, int(dec_mask.sum()), int(obj[r][dec_mask][0])))
    return out


# ---- peak --------------------------------------------------------------------------------------


def measure_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best float32 n x n matmul rate (FLOP/s) in JAX and in PyTorch."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3

    dot = jax.jit(jnp.dot)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot(ja, jb).block_until_ready()
    jax_best = min(_timed(lambda: dot(ja, jb).block_until_ready()) for _ in range(repeats))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch.mm(ta, tb)
    torch_best = min(_timed(lambda: torch.mm(ta, tb)) for _ in range(repeats))
    return {
        "jax_flops_per_s": flops / jax_best,
        "torch_flops_per_s": flops / torch_best,
        "peak_flops_per_s": flops / min(jax_best, torch_best),
    }


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- ours --------------------------------------------------------------------------------------


class Ours:
    """Our Trainer on `config` (t5_1_1 small by default), fresh state, AdamW lr 5e-5, clip 1.0."""

    def __init__(self, config: T5Config, alpha: float, seed: int) -> None:
        self.config = config
        model = EncoderDecoderModel(config)
        optimizer, _ = optimizers.create_optimizer("adamw", learning_rate=5e-5, grad_clip_norm=1.0)
        self.partitioner = partitioning.create_partitioner()
        self.trainer = Trainer(
            model, optimizer, self.partitioner, [alpha, 1.0 - alpha], dropout_seed=seed
        )
        self.state = self.trainer.init_state(jax.random.PRNGKey(seed))
        self.metrics = None

    def step(self, batch: Batch) -> None:
        """One train step, waited for (the loop itself syncs only every log_period steps)."""
        self.state, m = self.trainer.train_step(
            self.state, self.partitioner.host_batch_to_global(batch)
        )
        self.metrics = add_metrics(self.metrics, m)
        jax.block_until_ready(self.state)

    def mean_loss(self) -> float:
        m = jax.device_get(self.metrics)
        return float(m["loss_sum"]) / float(m["num_steps"])


def pack_examples(examples: Sequence[ref.DssExample], input_len: int, target_len: int) -> Batch:
    """One packed batch of `examples` (label then rationale of each), as our feature converter
    packs them (data/batches.py: numpy, no TensorFlow)."""
    pairs = []
    for e in examples:
        pairs.append({"inputs": e.label_input, "targets": e.label, "objective_id": 0})
        pairs.append({"inputs": e.rationale_input, "targets": e.rationale, "objective_id": 1})
    rows = batches.pack_rows(pairs, {"inputs": input_len, "targets": target_len})
    return next(batches.batch_rows(rows, len(rows)))


# ---- data --------------------------------------------------------------------------------------


def random_examples(
    rng: np.random.Generator,
    batch: int,
    input_length: int,
    label_length: int,
    rationale_length: int,
    vocab_size: int = 32000,
) -> list[ref.DssExample]:
    """`batch` DSS examples of random ids of exactly these lengths (EOS last)."""

    def ids(n: int) -> np.ndarray:
        x = rng.integers(2, vocab_size, n).astype(np.int64)
        x[-1] = 1  # EOS
        return x

    n, lab, rat = input_length, label_length, rationale_length
    return [ref.DssExample(ids(n), ids(lab), ids(n), ids(rat)) for _ in range(batch)]


def fixed_shape_batches(
    rng: np.random.Generator,
    steps: int,
    batch: int,
    input_length: int,
    label_length: int,
    rationale_length: int,
    vocab_size: int = 32000,
) -> tuple[list[Batch], list[list[ref.DssExample]]]:
    """(ours, reference) batches of mode (a): one row per example holding its two inputs and its
    label + rationale targets, so ours computes exactly the reference's tokens, no padding."""
    lengths = (input_length, label_length, rationale_length)
    ref_batches = [random_examples(rng, batch, *lengths, vocab_size) for _ in range(steps)]
    in_len, tgt_len = 2 * input_length, label_length + rationale_length
    ours_batches = [pack_examples(b, in_len, tgt_len) for b in ref_batches]
    rows = {len(b["encoder_input_tokens"]) for b in ours_batches}
    if rows != {batch}:
        raise RuntimeError(f"packing gave {rows} rows per batch, expected {batch}")
    return ours_batches, ref_batches


def cqa_examples() -> list[ref.DssExample]:
    """Every CQA train example as token ids, texts exactly as our cqa_dss task builds them."""
    import distill_sbs.tasks  # noqa: F401  (registers cqa)

    from distill_sbs import data

    vocab = data.get_dataset_spec("cqa").vocabulary
    label = {e["id"]: e for e in data.build_examples("cqa", "dss", 0, "train")}
    rationale = {e["id"]: e for e in data.build_examples("cqa", "dss", 1, "train")}

    def enc(text: str) -> np.ndarray:
        return np.asarray(list(vocab.encode(text)) + [1], np.int64)  # EOS, as seqio adds it

    return [
        ref.DssExample(
            enc(label[i]["inputs"]),
            enc(label[i]["targets"]),
            enc(rationale[i]["inputs"]),
            enc(rationale[i]["targets"]),
        )
        for i in label
        if i in rationale
    ]


def cqa_packed_batches(args: SimpleNamespace, n: int) -> tuple[list[Batch], float]:
    """n packed batches from our data layer, and the seconds per batch the pipeline took."""
    import distill_sbs.tasks  # noqa: F401  (registers cqa_dss)

    from distill_sbs import data

    inputs, targets = (int(x) for x in args.pack_lengths.split(","))
    t0 = time.perf_counter()
    ds = data.get_dataset(
        "cqa_dss",
        task_feature_lengths={"inputs": inputs, "targets": targets},
        split="train",
        batch_size=args.pack_rows,
        shuffle=True,
        seed=args.seed,
        pack=True,
    )
    it = ds.as_numpy_iterator()
    first = next(it)  # excludes the pipeline's start-up (record loading, tokenizer) from its rate
    t1 = time.perf_counter()
    batches = [first] + [next(it) for _ in range(n - 1)]
    per_batch = (time.perf_counter() - t1) / max(n - 1, 1)
    print(f"  our input pipeline: start-up {t1 - t0:.1f}s, {per_batch * 1e3:.0f} ms/batch")
    return batches, per_batch


# ---- measurement -------------------------------------------------------------------------------


class Side:
    """Timing of one implementation: per-step seconds, examples, tokens, model FLOPs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.times: list[float] = []
        self.examples = 0.0
        self.tokens = 0
        self.padded_tokens = 0
        self.flops = 0.0
        self.warmup_s: list[float] = []

    def summary(self, peak: float) -> dict[str, Any]:
        total = sum(self.times)
        return {
            "steps": len(self.times),
            "seconds": total,
            "step_s": self.times,
            "median_step_s": statistics.median(self.times),
            "examples_per_step": self.examples / len(self.times),
            "examples_per_s": self.examples / total,
            "tokens_per_s": self.tokens / total,
            "padding_fraction": 1.0 - self.tokens / max(self.padded_tokens, 1),
            "model_flops_per_example": self.flops / max(self.examples, 1e-9),
            "model_flops_per_s": self.flops / total,
            "mfu": self.flops / total / peak,
            "warmup_s": self.warmup_s,
        }


def _alternate(
    steps: int,
    rounds: int,
    run_ours: Callable[[int], None],
    run_ref: Callable[[int], None],
) -> None:
    """Runs step indices 0..steps-1 of each side in `rounds` alternating blocks."""
    bounds = np.linspace(0, steps, max(1, min(rounds, steps)) + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        for i in range(lo, hi):
            run_ours(i)
        for i in range(lo, hi):
            run_ref(i)


def compare_steps(
    ours: Ours,
    reference: ref.ReferenceDssTrainer,
    ours_batches: Sequence[Batch],
    ref_batches: Sequence[Sequence[ref.DssExample]],
    *,
    warmup: int,
    steps: int,
    rounds: int,
    peak: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """Times ours on ours_batches and the reference on ref_batches (first `warmup` untimed);
    the reference's batches are collated onto `device` inside its timed step."""
    a, r = Side("ours"), Side("reference")

    # Untimed: compilation (ours), then the process heap's growth. Both sides share one heap
    # (one arena, no trimming: cpu_host), so the first step of ours after the reference's first
    # step grows it to what both need together, once: 530,000 minor page faults and 7 s of
    # system time in that one step on this VM, none after (getrusage per step).
    for i in range(warmup):
        a.warmup_s.append(_timed(lambda i=i: ours.step(ours_batches[i])))
        r.warmup_s.append(_timed(lambda i=i: reference.step(ref.collate(ref_batches[i], device))))

    def run_ours(i: int) -> None:
        batch = ours_batches[warmup + i]
        a.times.append(_timed(lambda: ours.step(batch)))
        segs = packed_segments(batch)
        a.examples += len(segs) / 2.0
        a.tokens += sum(li + lt for li, lt, _ in segs)
        a.padded_tokens += batch["encoder_input_tokens"].size + batch["decoder_target_tokens"].size
        a.flops += sum(sequence_train_flops(ours.config, li, lt) for li, lt, _ in segs)

    def run_ref(i: int) -> None:
        examples = ref_batches[warmup + i]
        # Collation (dynamic padding) is timed: the reference's dataloader does it per batch.
        t0 = time.perf_counter()
        batch = ref.collate(examples, device)
        reference.step(batch)
        r.times.append(time.perf_counter() - t0)
        r.examples += len(examples)
        for e in examples:
            r.tokens += len(e.label_input) + len(e.label) + len(e.rationale_input)
            r.tokens += len(e.rationale)
            r.flops += sequence_train_flops(ours.config, len(e.label_input), len(e.label))
            r.flops += sequence_train_flops(ours.config, len(e.rationale_input), len(e.rationale))
        for part in batch.values():  # computed positions: inputs and labels, padded
            r.padded_tokens += part["input_ids"].numel() + part["labels"].numel()

    _alternate(steps, rounds, run_ours, run_ref)
    out = {"ours": a.summary(peak), "reference": r.summary(peak)}
    out["ratio_examples_per_s"] = out["ours"]["examples_per_s"] / out["reference"]["examples_per_s"]
    out["ours"]["final_mean_loss"] = ours.mean_loss()
    shapes = {k: list(v.shape) for k, v in ours_batches[0].items() if k.endswith("_tokens")}
    out["ours"]["batch_shapes"] = shapes
    return out


def run_mode(
    mode: str,
    args: SimpleNamespace,
    peak: float,
    ours_batches: Sequence[Batch],
    ref_batches: Sequence[Sequence[ref.DssExample]],
    warmup: int,
) -> dict[str, Any]:
    """Both sides on the t5_1_1 small shape, float32, on this CPU."""
    ours = Ours(T5Config(dropout_rate=args.dropout), args.alpha, args.seed)
    model = ref.ReferenceDssTrainer(ref.t5_1_1_small(args.dropout), alpha=args.alpha)
    out = compare_steps(
        ours,
        model,
        ours_batches,
        ref_batches,
        warmup=warmup,
        steps=args.steps,
        rounds=args.rounds,
        peak=peak,
    )
    print_mode(mode, out)
    return out


def mode_a(args: SimpleNamespace, peak: float) -> dict[str, Any]:
    print(
        f"(a) fixed shapes: {args.batch} examples/step, inputs {args.input_length}, "
        f"label {args.label_length}, rationale {args.rationale_length}"
    )
    rng = np.random.default_rng(args.seed)
    ours_batches, ref_batches = fixed_shape_batches(
        rng,
        args.warmup + args.steps,
        args.batch,
        args.input_length,
        args.label_length,
        args.rationale_length,
    )
    return run_mode("a", args, peak, ours_batches, ref_batches, args.warmup)


def mode_b(args: SimpleNamespace, peak: float) -> dict[str, Any]:
    if not os.environ.get("DISTILL_SBS_DATA_DIR"):  # the vocabulary defaults to the packaged one
        raise SystemExit("mode b needs $DISTILL_SBS_DATA_DIR (see the module docstring)")
    print(
        f"(b) CQA train: reference {args.batch} examples/step padded per batch; "
        f"ours packed {args.pack_rows} x {args.pack_lengths}"
    )
    warmup = args.warmup
    examples = cqa_examples()
    order = np.random.default_rng(args.seed).permutation(len(examples))
    n = warmup + args.steps
    ref_batches = [
        [examples[j] for j in order[i * args.batch : (i + 1) * args.batch]] for i in range(n)
    ]
    ours_batches, pipeline_s = cqa_packed_batches(args, n)
    out = run_mode("b", args, peak, ours_batches, ref_batches, warmup)
    per_batch = out["ours"]["examples_per_step"]
    out["ours"]["input_pipeline_examples_per_s"] = per_batch / pipeline_s
    out["examples_in_dataset"] = len(examples)
    return out


# ---- report ------------------------------------------------------------------------------------


def print_mode(mode: str, out: dict[str, Any]) -> None:
    head = (
        f"{'mode':<4} {'impl':<10} {'ex/step':>8} {'s/step':>8} {'examples/s':>11} "
        f"{'tokens/s':>9} {'pad%':>5} {'MFU':>6} {'warm-up s':>10}"
    )
    print(head)
    for name in ("ours", "reference"):
        s = out[name]
        warm = "/".join(f"{w:.1f}" for w in s["warmup_s"])
        print(
            f"{mode:<4} {name:<10} {s['examples_per_step']:>8.1f} {s['median_step_s']:>8.2f} "
            f"{s['examples_per_s']:>11.2f} {s['tokens_per_s']:>9.0f} "
            f"{100 * s['padding_fraction']:>5.1f} {100 * s['mfu']:>5.1f}% {warm:>10}"
        )
    print(f"{mode:<4} ratio ours/reference examples/s: {out['ratio_examples_per_s']:.2f}x")
    print(flush=True)


def main(args: SimpleNamespace) -> dict[str, Any]:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    load = os.getloadavg()
    print(
        f"cores {len(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}, "
        f"jax devices {jax.devices()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    peak = measure_peak()
    print(
        f"matmul peak (float32 2048^3): jax {peak['jax_flops_per_s'] / 1e9:.1f} GFLOP/s, "
        f"torch {peak['torch_flops_per_s'] / 1e9:.1f} GFLOP/s\n"
    )
    result: dict[str, Any] = {
        "peak": peak,
        "args": vars(args),
        "load_average_start": load,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if args.mode in ("a", "both"):
        result["a"] = mode_a(args, peak["peak_flops_per_s"])
    if args.mode in ("b", "both"):
        result["b"] = mode_b(args, peak["peak_flops_per_s"])
    result["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {result['load_average_end'][0]:.2f}")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(ARGS)
