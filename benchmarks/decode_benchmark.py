"""Greedy decoding throughput: distill_sbs (JAX, one compiled while_loop over a KV cache) vs
Hugging Face `generate` (PyTorch), same random T5 1.1 small weights, same inputs, same CPU.

    python benchmarks/decode_benchmark.py --out /tmp/decode_benchmark.json

Prints tokens/s of each (batch * new tokens / median wall time, after compilation / warm-up) and
their ratio, and writes them as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import numpy as np
import torch
import transformers
from _reference_dss import t5_1_1_small  # benchmarks/ is on sys.path when run as a script
from absl import app, flags

from distill_sbs import convert
from distill_sbs.models import EncoderDecoderModel

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "decode_benchmark.json", "JSON output path.")
flags.DEFINE_integer("batch", 8, "Sequences per batch.")
flags.DEFINE_integer("input_length", 128, "Input tokens per sequence.")
flags.DEFINE_integer("new_tokens", 32, "Generated tokens per sequence.")
flags.DEFINE_integer("repeats", 5, "Timed runs per side (the median is reported).")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: torch default).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = FLAGS
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    # T5 1.1 small shapes (gin/models/t5_1_1_small.gin), random weights: the same HF model as
    # the training benchmark's reference.
    hf = t5_1_1_small(dropout_rate=0.0).eval()
    with torch.no_grad():
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(32128, 512) * 512**-0.5)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    config = convert.hf_config_to_t5config(hf.config.to_dict())
    params = jax.device_put(convert.hf_state_dict_to_params(state, config))
    model = EncoderDecoderModel(config)

    rng = np.random.default_rng(0)
    enc = rng.integers(2, 32000, (args.batch, args.input_length)).astype(np.int32)
    enc[:, -1] = 1
    n_tokens = args.batch * args.new_tokens

    def ours() -> np.ndarray:
        return np.asarray(
            model.generate(params, enc, max_decode_length=args.new_tokens).block_until_ready()
        )

    t0 = time.perf_counter()
    ours_ids = ours()
    compile_s = time.perf_counter() - t0
    ours_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours()
        ours_times.append(time.perf_counter() - t0)

    enc_t = torch.tensor(enc, dtype=torch.long)

    def theirs() -> np.ndarray:
        with torch.no_grad():
            return hf.generate(
                input_ids=enc_t,
                attention_mask=torch.ones_like(enc_t),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                num_beams=1,
                decoder_start_token_id=0,
                eos_token_id=1,
                pad_token_id=0,
            ).numpy()[:, 1:]

    hf_ids = theirs()  # warm-up
    hf_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        theirs()
        hf_times.append(time.perf_counter() - t0)

    hf_ids = np.pad(hf_ids, ((0, 0), (0, args.new_tokens - hf_ids.shape[1])))
    ours_tps = n_tokens / statistics.median(ours_times)
    hf_tps = n_tokens / statistics.median(hf_times)
    result = {
        "config": "t5_1_1_small shape, random weights, float32",
        "batch": args.batch,
        "input_length": args.input_length,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "ours_tokens_per_s": ours_tps,
        "hf_tokens_per_s": hf_tps,
        "ratio": ours_tps / hf_tps,
        "ours_times_s": ours_times,
        "hf_times_s": hf_times,
        "ours_compile_and_first_run_s": compile_s,
        "same_tokens_as_hf": bool(np.array_equal(ours_ids, hf_ids)),
        "token_agreement": float(np.mean(ours_ids == hf_ids)),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(
        f"ours {ours_tps:.1f} tokens/s | HF generate {hf_tps:.1f} tokens/s | "
        f"ratio {result['ratio']:.2f}x | same tokens: {result['same_tokens_as_hf']}"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
