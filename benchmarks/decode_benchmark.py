"""Greedy decoding throughput: distill_sbs (JAX, one compiled while_loop over a KV cache) vs
Hugging Face `generate` (PyTorch), same random T5 1.1 small weights, same inputs, same CPU.

    python benchmarks/decode_benchmark.py --out /tmp/decode_benchmark.json

Prints tokens/s of each (batch * new tokens / median wall time, after compilation / warm-up) and
their ratio, and writes them as JSON. `compare_decoding` is the measurement, for any shape,
device and precision (benchmarks/device_check.py runs it on an accelerator in bf16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import numpy as np
import torch
import transformers
from _reference_dss import hf_t5  # benchmarks/ is on sys.path when run as a script
from absl import app, flags

from distill_sbs import convert
from distill_sbs.models import EncoderDecoderModel
from distill_sbs.network import T5Config


def _define_flags() -> None:
    flags.DEFINE_string("out", "decode_benchmark.json", "JSON output path.")
    flags.DEFINE_integer("batch", 8, "Sequences per batch.")
    flags.DEFINE_integer("input_length", 128, "Input tokens per sequence.")
    flags.DEFINE_integer("new_tokens", 32, "Generated tokens per sequence.")
    flags.DEFINE_integer("repeats", 5, "Timed runs per side (the median is reported).")
    flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: torch default).")


def _timed_runs(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def compare_decoding(
    config: T5Config,
    *,
    batch: int,
    input_length: int,
    new_tokens: int,
    repeats: int,
    device: str = "cpu",
    autocast: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """Greedy decoding of the same random weights and inputs by ours (`config.dtype`
    activations) and by HF generate (on `device`, under `autocast` if given): tokens/s, the
    ratio, and how many tokens agree."""
    # Random weights, the output layer rescaled to unit-variance logits (HF's init makes them
    # nearly flat, and greedy decoding of flat logits is ties).
    hf = hf_t5(dataclasses.replace(config, dropout_rate=0.0), attn_implementation).eval()
    with torch.no_grad():
        hf.lm_head.weight = torch.nn.Parameter(
            torch.randn(config.vocab_size, config.emb_dim) * config.emb_dim**-0.5
        )
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = jax.device_put(convert.hf_state_dict_to_params(state, config))
    hf = hf.to(device)
    model = EncoderDecoderModel(config)

    rng = np.random.default_rng(0)
    enc = rng.integers(2, min(config.vocab_size, 32000), (batch, input_length)).astype(np.int32)
    enc[:, -1] = 1
    n_tokens = batch * new_tokens

    def ours() -> np.ndarray:
        return np.asarray(
            model.generate(params, enc, max_decode_length=new_tokens).block_until_ready()
        )

    t0 = time.perf_counter()
    ours_ids = ours()
    compile_s = time.perf_counter() - t0
    ours_times = _timed_runs(ours, repeats)

    enc_t = torch.tensor(enc, dtype=torch.long, device=device)

    def theirs() -> np.ndarray:
        with (
            torch.no_grad(),
            torch.autocast(hf.device.type, autocast, enabled=autocast is not None),
        ):
            out = hf.generate(
                input_ids=enc_t,
                attention_mask=torch.ones_like(enc_t),
                max_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                decoder_start_token_id=0,
                eos_token_id=1,
                pad_token_id=0,
            )
        return out.cpu().numpy()[:, 1:]  # waits for the device

    hf_ids = theirs()  # warm-up
    hf_times = _timed_runs(theirs, repeats)

    hf_ids = np.pad(hf_ids, ((0, 0), (0, new_tokens - hf_ids.shape[1])))
    ours_tps = n_tokens / statistics.median(ours_times)
    hf_tps = n_tokens / statistics.median(hf_times)
    return {
        "batch": batch,
        "input_length": input_length,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "dtype": config.dtype,
        "hf_autocast": str(autocast) if autocast is not None else None,
        "hf_attention": hf.config._attn_implementation,
        "ours_tokens_per_s": ours_tps,
        "hf_tokens_per_s": hf_tps,
        "ratio": ours_tps / hf_tps,
        "ours_times_s": ours_times,
        "hf_times_s": hf_times,
        "ours_compile_and_first_run_s": compile_s,
        "same_tokens_as_hf": bool(np.array_equal(ours_ids, hf_ids)),
        "token_agreement": float(np.mean(ours_ids == hf_ids)),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    # T5 1.1 small shapes (gin/models/t5_1_1_small.gin), random weights: the same HF model as
    # the training benchmark's reference.
    result = {
        "config": "t5_1_1_small shape, random weights, float32",
        **compare_decoding(
            T5Config(),
            batch=args.batch,
            input_length=args.input_length,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
        ),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(
        f"ours {result['ours_tokens_per_s']:.1f} tokens/s | HF generate "
        f"{result['hf_tokens_per_s']:.1f} tokens/s | ratio {result['ratio']:.2f}x | same tokens: "
        f"{result['same_tokens_as_hf']}"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
