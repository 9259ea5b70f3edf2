"""Model FLOPs of T5 training and the accelerator's peak, for tokens/s and MFU in the train log.

The formula (docs/benchmarks.md, "Model FLOPs"): per (input, target) sequence pair of real
(unpadded) lengths l_i, l_t, matmuls only, forward x 3 for forward + backward:

    per token, encoder layer:   2 e (4 h d) + mlp            (q, k, v, o projections; MLP)
    per token, decoder layer:   2 e (6 h d) + mlp            (self q k v o, cross q o)
    per input token, decoder:   2 e (2 h d) per layer        (cross-attention keys, values)
    per target token:           2 e V                        (logits)
    attention, per layer:       4 h d l_i^2 (encoder), 4 h d (l_t^2 + l_t l_i) (decoder)
    mlp = 2 e f n_wi + 2 f e    (n_wi: 1 for ReLU, 2 for gated GELU)

(e = emb_dim, h d = heads x head_dim, f = mlp_dim, V = vocabulary). Causal self-attention is
counted as the full square, by convention. Padding, packing and masked attention across packed
sequences are not model FLOPs, so they show as lost utilisation; embeddings, norms, softmax and
the optimizer are not counted.

MFU = model FLOPs per second / (peak FLOP/s per device x devices). The peak comes from
`PEAK_FLOPS` by `device.device_kind` (dense bf16 per JAX device, the usual MFU convention, also
for float32 models, whose matmuls run at bf16 or TF32 rates there) or, on CPU and unknown kinds,
is measured: the best rate of a float32 2048 x 2048 matmul at start-up. `DISTILL_SBS_PEAK_FLOPS`
(FLOP/s per device, e.g. 4e11), where set, is taken instead of both: a known peak for an unlisted
accelerator, or a fixed one where the second of measuring at every start matters (the tests'
many short runs).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from distill_sbs.errors import UserError
from distill_sbs.network import T5Config

PEAK_FLOPS_ENV = "DISTILL_SBS_PEAK_FLOPS"

# Dense bf16 peak FLOP/s per JAX device, by device_kind. TPU v2/v3 expose each core as a device
# (half a chip); v4 and v5p expose one megacore chip; v5e/v6e ("lite") one single-core chip.
PEAK_FLOPS: dict[str, float] = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10G": 125e12,
}


def sequence_train_flops(cfg: T5Config, input_len: float, target_len: float) -> float:
    """Matmul FLOPs of one (input, target) pair through forward and backward (the formula above).

    Lengths may be numpy arrays (one entry per sequence); the result then has their shape."""
    e, hd, f, v = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    mlp = 2 * e * f * len(cfg.mlp_activations) + 2 * f * e
    enc_tok = cfg.num_encoder_layers * (4 * 2 * e * hd + mlp)
    cross_kv_tok = cfg.num_decoder_layers * 2 * 2 * e * hd
    dec_tok = cfg.num_decoder_layers * (6 * 2 * e * hd + mlp) + 2 * e * v
    li, lt = input_len, target_len
    fwd = li * (enc_tok + cross_kv_tok) + lt * dec_tok
    fwd = fwd + cfg.num_encoder_layers * 4 * li * li * hd
    fwd = fwd + cfg.num_decoder_layers * 4 * (lt * lt + lt * li) * hd
    return 3.0 * fwd


def _segment_lengths(segment_ids: np.ndarray) -> np.ndarray:
    """int [batch, max segment]: tokens of each segment (1, 2, ...) of each row; 0 if absent."""
    rows, _ = segment_ids.shape
    width = int(segment_ids.max(initial=0)) + 1
    flat = (np.arange(rows)[:, None] * width + segment_ids).reshape(-1)
    return np.bincount(flat, minlength=rows * width).reshape(rows, width)[:, 1:]


def sequence_lengths(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(input lengths, target lengths) of every sequence of a feature-converted host batch.

    Packed batches are split by their segment ids; unpacked rows count their non-pad tokens."""
    if "encoder_segment_ids" in batch:
        enc = _segment_lengths(np.asarray(batch["encoder_segment_ids"]))
        dec = _segment_lengths(np.asarray(batch["decoder_segment_ids"]))
        width = max(enc.shape[1], dec.shape[1])
        enc = np.pad(enc, ((0, 0), (0, width - enc.shape[1])))
        dec = np.pad(dec, ((0, 0), (0, width - dec.shape[1])))
        present = (enc > 0) | (dec > 0)
        return enc[present], dec[present]
    enc = np.sum(np.asarray(batch["encoder_input_tokens"]) > 0, axis=1)
    dec = np.sum(np.asarray(batch["decoder_loss_weights"]) > 0, axis=1)
    return enc, dec


def batch_train_flops(cfg: T5Config, batch: Mapping[str, np.ndarray]) -> tuple[float, int]:
    """(model FLOPs of one train step on `batch`, real tokens: inputs + targets, no padding)."""
    li, lt = sequence_lengths(batch)
    li, lt = li.astype(np.float64), lt.astype(np.float64)
    return float(np.sum(sequence_train_flops(cfg, li, lt))), int(li.sum() + lt.sum())


def measure_matmul_peak(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` float32 n x n matmuls on the default device."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it came from: 'DISTILL_SBS_PEAK_FLOPS', 'table: <kind>'
    or 'measured: ...')."""
    given = os.environ.get(PEAK_FLOPS_ENV, "")
    if given:
        return _given_peak(given), PEAK_FLOPS_ENV
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "")
    if kind in PEAK_FLOPS:
        return PEAK_FLOPS[kind], f"table: {kind}"
    return _measured_peak(kind or device.platform)


def _given_peak(value: str) -> float:
    try:
        peak = float(value)
    except ValueError:
        peak = float("nan")
    if not peak > 0 or peak == float("inf"):
        raise UserError(f"{PEAK_FLOPS_ENV}={value!r}: not a positive number of FLOP/s per device")
    return peak


@functools.cache
def _measured_peak(device_name: str) -> tuple[float, str]:
    """Once per process and device kind: the timed matmul takes about a second, and a sweep
    trains all its runs in one process."""
    return measure_matmul_peak(), f"measured: float32 2048^3 matmul on {device_name}"


class Throughput:
    """Host-side counter of model FLOPs and real tokens of the steps since the last log."""

    def __init__(self, cfg: T5Config, peak_flops: float) -> None:
        self.cfg = cfg
        self.peak_flops = peak_flops  # of all devices that run this host's batches
        self.flops = 0.0
        self.tokens = 0
        self.steps = 0

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        flops, tokens = batch_train_flops(self.cfg, batch)
        self.flops += flops
        self.tokens += tokens
        self.steps += 1

    def summary(self, steps_per_sec: float) -> dict[str, float]:
        """tokens/s, model FLOP/s and MFU of the window at `steps_per_sec`; resets the window."""
        n = max(self.steps, 1)
        flops_per_s = self.flops / n * steps_per_sec
        out = {
            "tokens_per_s": self.tokens / n * steps_per_sec,
            "model_flops_per_s": flops_per_s,
            "mfu": flops_per_s / self.peak_flops,
        }
        self.flops, self.tokens, self.steps = 0.0, 0, 0
        return out
