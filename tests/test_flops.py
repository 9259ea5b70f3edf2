"""Model FLOPs (flops.py) against XLA's own count, sequence lengths of packed batches, and the
tokens/s and MFU of the train log."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_sbs import flops
from distill_sbs.errors import UserError
from distill_sbs.network import T5Config

# Wide enough that matmuls dominate XLA's count (norms, softmax, activations are a few percent).
_CFG = T5Config(
    vocab_size=2048,
    emb_dim=256,
    num_heads=4,
    head_dim=64,
    mlp_dim=1024,
    num_encoder_layers=2,
    num_decoder_layers=2,
)


@pytest.mark.parametrize("activations", [("gelu", "linear"), ("relu",)])
def test_forward_flops_match_xla_cost_analysis(activations):
    from distill_sbs.models import EncoderDecoderModel

    cfg = T5Config(**{**_CFG.to_dict(), "mlp_activations": activations})
    model = EncoderDecoderModel(cfg)
    params = model.init_params(jax.random.PRNGKey(0))
    li, lt = 96, 40
    enc, dec = jnp.ones((1, li), jnp.int32), jnp.ones((1, lt), jnp.int32)
    compiled = jax.jit(lambda p: model.logits(p, enc, dec)).lower(params).compile()
    analysis = compiled.cost_analysis()
    xla = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    ours = flops.sequence_train_flops(cfg, li, lt) / 3.0  # forward only
    # XLA also counts elementwise work, so it is a little above the matmul-only count.
    assert ours <= xla <= 1.08 * ours, (ours, xla)


def test_sequence_lengths_of_packed_and_unpacked_batches():
    packed = {
        # row 0: inputs of 3 and 2 tokens, targets of 2 and 4; row 1: one sequence, then padding
        "encoder_segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]),
        "decoder_segment_ids": np.array([[1, 1, 2, 2, 2, 2], [1, 0, 0, 0, 0, 0]]),
    }
    li, lt = flops.sequence_lengths(packed)
    assert li.tolist() == [3, 2, 4] and lt.tolist() == [2, 4, 1]
    unpacked = {
        "encoder_input_tokens": np.array([[5, 6, 1, 0], [7, 1, 0, 0]]),
        "decoder_loss_weights": np.array([[1, 1, 0], [1, 1, 1]]),
    }
    li, lt = flops.sequence_lengths(unpacked)
    assert li.tolist() == [3, 2] and lt.tolist() == [2, 3]
    total, tokens = flops.batch_train_flops(_CFG, packed)
    expected = sum(flops.sequence_train_flops(_CFG, a, b) for a, b in [(3, 2), (2, 4), (4, 1)])
    assert total == pytest.approx(expected) and tokens == 16


def test_peak_comes_from_the_device_kind_table_or_is_measured(monkeypatch):
    monkeypatch.delenv(flops.PEAK_FLOPS_ENV, raising=False)  # conftest gives one to the suite
    tpu = types.SimpleNamespace(device_kind="TPU v4", platform="tpu")
    assert flops.peak_flops_per_device(tpu) == (275e12, "table: TPU v4")
    cpu = types.SimpleNamespace(device_kind="cpu", platform="cpu")
    peak, source = flops.peak_flops_per_device(cpu)
    assert source.startswith("measured") and 1e8 < peak < 1e14
    # measured once per process (a sweep trains all its runs in one): the same figure again
    assert flops.peak_flops_per_device(cpu) == (peak, source)


def test_a_given_peak_is_taken_over_the_table_and_the_measurement(monkeypatch):
    tpu = types.SimpleNamespace(device_kind="TPU v4", platform="tpu")
    cpu = types.SimpleNamespace(device_kind="cpu", platform="cpu")
    monkeypatch.setenv(flops.PEAK_FLOPS_ENV, "1.5e11")
    for device in (tpu, cpu, None):
        assert flops.peak_flops_per_device(device) == (1.5e11, "DISTILL_SBS_PEAK_FLOPS")
    for bad in ("fast", "0", "-1e9", "inf", "nan"):
        monkeypatch.setenv(flops.PEAK_FLOPS_ENV, bad)
        with pytest.raises(UserError) as e:
            flops.peak_flops_per_device(cpu)
        assert str(e.value) == (
            f"DISTILL_SBS_PEAK_FLOPS={bad!r}: not a positive number of FLOP/s per device"
        )


def test_log_line_and_metrics_file_carry_tokens_per_s_and_mfu(tmp_path, capsys):
    from distill_sbs.train import _ReportProgress, create_writers, log_train

    batch = {
        "encoder_segment_ids": np.array([[1, 1, 2, 2]]),
        "decoder_segment_ids": np.array([[1, 2, 2, 0]]),
    }
    step_flops, step_tokens = flops.batch_train_flops(_CFG, batch)
    writers = create_writers(str(tmp_path))
    progress = _ReportProgress(every_steps=2, every_secs=None, writer=writers.progress)
    progress.throughput = flops.Throughput(_CFG, peak_flops=step_flops)  # 1 step/s = MFU 100%
    progress(0, t=0.0)
    for step in (1, 2):
        progress.throughput.add(batch)
        progress(step, t=4.0 * step)  # 2 steps in 8 s: 0.25 steps/s
    sums = {
        "num_steps": 2.0,
        "loss_sum": 3.0,
        "grad_norm_sum": 1.0,
        "tokens": np.array([5.0]),
        "ce_sum": np.array([5.0]),
        "correct": np.array([1.0]),
    }
    run = types.SimpleNamespace(lr_schedule=lambda s: 0.1, objective_names=["label"])
    cfg = types.SimpleNamespace(train_steps=10, batch_size=1)
    summary = log_train(run, cfg, 2, sums, progress, writers.train)
    writers.train.close()
    assert summary["tokens_per_s"] == pytest.approx(0.25 * step_tokens)
    assert summary["mfu"] == pytest.approx(0.25)
    assert f"{0.25 * step_tokens:.0f} tokens/s, MFU 25.0%" in capsys.readouterr().out
    (line,) = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["mfu"] == pytest.approx(0.25)
    assert progress.throughput.steps == 0  # the window restarts after each log
