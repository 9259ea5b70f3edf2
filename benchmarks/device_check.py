"""The accelerator check: one command, about 5 minutes on one H100/H200, no TensorFlow or seqio
needed (jax, flax, optax, orbax, torch, transformers, sentencepiece):

    python benchmarks/device_check.py --json_out /tmp/device_check.json
    python benchmarks/device_check.py --dry_run     # CPU, tiny shapes: what CI runs

For each size (--sizes; t5_1_1 small and base from the package's gin/models files):

- train: the DSS step (alpha 0.5, AdamW lr 5e-5, clip 1.0, dropout 0.1) in bf16, ours
  (`Trainer.train_step`, float32 parameters and optimizer, bfloat16 activations) vs the Hugging
  Face reference (`_reference_dss.py`: float32 weights, forward under torch.autocast bf16, SDPA
  attention) in this process, alternating, on the same random fixed-shape examples
  (train_benchmark.py's mode (a)): examples/s, tokens/s and MFU against the device's dense bf16
  peak (`distill_sbs.flops.PEAK_FLOPS` by device kind; measured on CPU).
- memory: our memory plan of that step (`distill_sbs.memory_plan.plan`, the XLA memory analysis
  of the compiled step; also under each --remat_policies value, `network.remat_policy`) against
  the device's measured peak bytes in use after our steps (JAX
  does not preallocate here, so the peak is what the step used; the reference's torch peak is
  reported beside it).
- decode: greedy decoding of random weights, ours vs HF generate (decode_benchmark.py), bf16.

`--attention cudnn --dropout 0` runs our side (step, plans, decoding) with cuDNN's fused
attention (`network.attention_impl`; the reference drops dropout too), `xla` the same call on
any backend; the default is the einsum path.

Figures are printed and the JSON is rewritten after every section, so a run cut short keeps what
it measured. The dry run does everything on tiny configs with one step, so the device run is not
the script's first.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

# Before JAX starts: no preallocation (torch shares the device, and the peak is the step's own).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import _reference_dss as ref  # noqa: E402
import gin  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_benchmark as tb  # noqa: E402
import transformers  # noqa: E402
from decode_benchmark import compare_decoding  # noqa: E402

from distill_sbs import flops, memory_plan  # noqa: E402
from distill_sbs.network import ATTENTION_IMPLS, T5Config  # noqa: E402

GIB = 1024**3
MODELS_DIR = os.path.join(os.path.dirname(flops.__file__), "gin", "models")

# The dry run's stand-ins for small and base: the same code paths in seconds on a CPU.
TINY = {
    "small": T5Config(
        vocab_size=512,
        emb_dim=32,
        num_heads=2,
        num_encoder_layers=2,
        num_decoder_layers=2,
        head_dim=16,
        mlp_dim=64,
    ),
    "base": T5Config(
        vocab_size=512,
        emb_dim=48,
        num_heads=3,
        num_encoder_layers=3,
        num_decoder_layers=3,
        head_dim=16,
        mlp_dim=96,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true", help="CPU, tiny configs, one step")
    p.add_argument("--json_out", default="device_check.json", help="write the figures here")
    p.add_argument("--sizes", default="small,base", help="t5_1_1 sizes, comma-separated")
    p.add_argument("--batch", type=int, default=64, help="DSS examples per train step")
    p.add_argument("--input_length", type=int, default=256, help="input tokens per example")
    p.add_argument("--label_length", type=int, default=16)
    p.add_argument("--rationale_length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed train steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps per side first")
    p.add_argument("--rounds", type=int, default=2, help="ours/reference alternating blocks")
    p.add_argument("--decode_batch", type=int, default=32)
    p.add_argument("--decode_input_length", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed decoding runs per side")
    p.add_argument(
        "--remat_policies",
        default="full",
        help="also plan the step under these network.remat_policy values (comma-separated)",
    )
    p.add_argument(
        "--attention",
        default="einsum",
        choices=ATTENTION_IMPLS,
        help="our attention (network.attention_impl): 'cudnn' is the fused flash attention on a "
        "GPU; 'xla' and 'cudnn' need --dropout 0 (they have no attention-weight dropout)",
    )
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.attention != "einsum" and args.dropout > 0:
        p.error(f"--attention {args.attention}: has no attention-weight dropout; pass --dropout 0")
    if args.dry_run:
        args.batch, args.input_length, args.label_length, args.rationale_length = 2, 12, 3, 6
        args.steps, args.warmup, args.rounds = 1, 1, 1
        args.decode_batch, args.decode_input_length, args.new_tokens, args.repeats = 2, 8, 4, 1
    sizes = args.sizes.split(",")
    unknown = sorted(set(sizes) - set(TINY))
    if unknown:
        p.error(f"--sizes: unknown {unknown}; known {sorted(TINY)}")
    args.sizes = sizes
    args.remat_policies = [x for x in args.remat_policies.split(",") if x]
    return args


def model_config(size: str, dry_run: bool) -> T5Config:
    """The t5_1_1 `size` shape from the package's gin file (bf16 activations; dropout later)."""
    if dry_run:
        return dataclasses.replace(TINY[size], dtype="bfloat16")
    gin.clear_config()
    gin.parse_config_file(os.path.join(MODELS_DIR, f"t5_1_1_{size}.gin"))
    config = T5Config()
    gin.clear_config()
    return dataclasses.replace(config, dtype="bfloat16")


def bind_network(args: argparse.Namespace, remat_policy: str | None = None) -> None:
    """Our network's gin settings from here on: --attention, and a remat policy to plan."""
    gin.clear_config()
    with gin.unlock_config():
        gin.bind_parameter("distill_sbs.network.attention_impl.impl", args.attention)
        if remat_policy is not None:
            gin.bind_parameter("distill_sbs.network.remat_policy.policy", remat_policy)


def device_peak_bytes() -> int | None:
    """Peak bytes in use on JAX's first device so far (None where the backend keeps no count)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def train_section(size: str, args: argparse.Namespace, peak: float, device: str) -> dict:
    """Ours vs the reference on one size: throughput, MFU, memory plan vs measured peak."""
    config = dataclasses.replace(model_config(size, args.dry_run), dropout_rate=args.dropout)
    bind_network(args)
    rng = np.random.default_rng(args.seed)
    ours_batches, ref_batches = tb.fixed_shape_batches(
        rng,
        args.warmup + args.steps,
        args.batch,
        args.input_length,
        args.label_length,
        args.rationale_length,
        vocab_size=min(config.vocab_size, 32000),
    )
    first = ours_batches[0]
    lengths = {
        "inputs": first["encoder_input_tokens"].shape[1],
        "targets": first["decoder_target_tokens"].shape[1],
    }

    ours = tb.Ours(config, args.alpha, args.seed)
    t0 = time.perf_counter()
    plan = memory_plan.plan(ours.trainer, args.batch, lengths, pack=True)
    plan_s = time.perf_counter() - t0
    remat = {}
    for policy in args.remat_policies:  # the same step, each layer rematerialised
        bind_network(args, policy)
        try:
            p = memory_plan.plan(ours.trainer, args.batch, lengths, pack=True)
        finally:
            bind_network(args)
        remat[policy] = {"temporaries": p.temporaries, "total": p.total}
    hf = ref.hf_t5(dataclasses.replace(config, dtype="float32"), "sdpa").to(device)
    reference = ref.ReferenceDssTrainer(hf, alpha=args.alpha, autocast=torch.bfloat16)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = tb.compare_steps(
        ours,
        reference,
        ours_batches,
        ref_batches,
        warmup=args.warmup,
        steps=args.steps,
        rounds=args.rounds,
        peak=peak,
        device=device,
    )
    measured = device_peak_bytes()
    out["reference"]["attention"] = hf.config._attn_implementation
    out["attention"] = args.attention
    if device == "cuda":
        out["reference"]["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    out["memory"] = {
        "plan": {**dataclasses.asdict(plan), "total": plan.total},
        "plan_compile_s": plan_s,
        "remat_plans": remat,
        "measured_peak_bytes": measured,
        "measured_over_plan": None if measured is None else measured / plan.total,
    }
    out["config"] = config.to_dict()
    out["rows"], out["lengths"] = args.batch, lengths
    tb.print_mode(f"{size}", out)
    seen = "n/a" if measured is None else f"{measured / GIB:.2f} GiB"
    remat_text = "".join(f", remat {k} {v['total'] / GIB:.2f} GiB" for k, v in remat.items())
    print(
        f"{size}: memory plan {plan.total / GIB:.2f} GiB{remat_text}, measured peak {seen}\n",
        flush=True,
    )
    del ours, reference, hf
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def decode_section(size: str, args: argparse.Namespace, device: str) -> dict:
    config = model_config(size, args.dry_run)
    bind_network(args)
    out = compare_decoding(
        config,
        batch=args.decode_batch,
        input_length=args.decode_input_length,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        device=device,
        autocast=torch.bfloat16,
        attn_implementation="sdpa",
    )
    print(
        f"{size} decode: ours {out['ours_tokens_per_s']:.0f} tokens/s | HF generate "
        f"{out['hf_tokens_per_s']:.0f} tokens/s | ratio {out['ratio']:.2f}x | tokens agreeing "
        f"{100 * out['token_agreement']:.0f}%\n",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.dry_run:
        jax.config.update("jax_platforms", "cpu")
    # The memory plan compiles the step that the first train step compiles again: with a
    # compilation cache the second is a cache hit (a minute of base's compile on a GPU).
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="device_check_xla_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    jax_device = jax.local_devices()[0]
    peak, peak_source = flops.peak_flops_per_device(jax_device)
    result: dict[str, Any] = {
        "args": vars(args),
        "jax_device": str(jax_device),
        "device_kind": getattr(jax_device, "device_kind", ""),
        "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "peak_flops_per_s": peak,
        "peak_source": peak_source,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
        # the gin files' shapes, read in the dry run too (its models are stand-ins)
        "configs": {size: model_config(size, False).to_dict() for size in args.sizes},
        "train": {},
        "decode": {},
    }
    print(f"JAX {result['jax_device']}, torch {result['torch_device']}, peak {peak / 1e12:.1f}")
    print(f"TFLOP/s ({peak_source})\n", flush=True)

    def write() -> None:
        result["elapsed_s"] = time.perf_counter() - start
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)

    for size in args.sizes:  # smallest first: the device's peak bytes only grow
        result["train"][size] = train_section(size, args, peak, device)
        write()
    for size in args.sizes:
        result["decode"][size] = decode_section(size, args, device)
        write()
    print(f"done in {result['elapsed_s']:.0f} s; figures in {args.json_out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
