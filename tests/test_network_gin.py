"""gin/models/*.gin parse and give the published shapes (numbers from the public HF config.json)."""

from __future__ import annotations

import os

import gin
import pytest

import distill_sbs
from distill_sbs.network import T5Config

GIN_DIR = os.path.join(os.path.dirname(distill_sbs.__file__), "gin", "models")

# (d_model, d_ff, d_kv, num_heads, num_layers) from t5-{small,base,large,3b,11b} and
# google/t5-v1_1-* / google/flan-t5-* config.json (vocab_size 32128 in all of them).
T5_1_0 = {
    "small": (512, 2048, 64, 8, 6),
    "base": (768, 3072, 64, 12, 12),
    "large": (1024, 4096, 64, 16, 24),
    "xl": (1024, 16384, 128, 32, 24),
    "xxl": (1024, 65536, 128, 128, 24),
}
T5_1_1 = {
    "small": (512, 1024, 64, 6, 8),
    "base": (768, 2048, 64, 12, 12),
    "large": (1024, 2816, 64, 16, 24),
    "xl": (2048, 5120, 64, 32, 24),
    "xxl": (4096, 10240, 64, 64, 24),
}
EXPECTED = {
    **{f"t5_1_0_{s}": (v, True) for s, v in T5_1_0.items()},
    **{f"t5_1_1_{s}": (v, False) for s, v in T5_1_1.items()},
    **{f"flan_t5_{s}": (v, False) for s, v in T5_1_1.items()},
}


def _build(name: str) -> T5Config:
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(GIN_DIR, f"{name}.gin"))
        return T5Config()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_shapes(name):
    (d_model, d_ff, d_kv, heads, layers), tied = EXPECTED[name]
    c = _build(name)
    got = (c.emb_dim, c.mlp_dim, c.head_dim, c.num_heads, c.num_encoder_layers)
    assert got == (d_model, d_ff, d_kv, heads, layers)
    assert c.num_decoder_layers == layers and c.vocab_size == 32128
    assert c.logits_via_embedding is tied
    assert c.mlp_activations == (("relu",) if tied else ("gelu", "linear"))
    assert c.relative_attention_num_buckets == 32 and c.dropout_rate == 0.1


def test_every_gin_file_is_covered_and_tiny_ones_build():
    names = {f[: -len(".gin")] for f in os.listdir(GIN_DIR) if f.endswith(".gin")}
    assert names == set(EXPECTED) | {"t5_1_0_tiny", "t5_1_1_tiny"}
    for name in ("t5_1_0_tiny", "t5_1_1_tiny"):
        c = _build(name)
        assert c.emb_dim == 32 and c.num_encoder_layers == 2 and c.dropout_rate == 0.0
        assert c.logits_via_embedding == (name == "t5_1_0_tiny")
