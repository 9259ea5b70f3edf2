"""The real-size checkpoint of issue 21's acceptance suite: t5_1_1-small's shape with 3 layers
each side and the 32,128-id vocabulary, random weights made here (no download)."""

from __future__ import annotations

import pytest
from _shared_data import SHARED

VOCAB = SHARED / "vocab" / "t5_spiece.model"
LAYERS = 3


def save_real_size_checkpoint(path: str) -> str:
    """t5_1_1-small's shape (d_model 512, 6 heads, d_ff 1024, gated GELU, untied output) with
    LAYERS layers each side, over the T5 SentencePiece of ../shared; a native checkpoint at
    `path`."""
    import jax

    from distill_sbs.checkpoints import save_native
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.network import T5Config

    if not VOCAB.is_file():
        pytest.fail(f"the T5 vocabulary is not at {VOCAB} (../shared/vocab)")
    cfg = T5Config(num_encoder_layers=LAYERS, num_decoder_layers=LAYERS)
    assert cfg.vocab_size == 32128 and cfg.emb_dim == 512 and cfg.mlp_dim == 1024
    save_native(path, EncoderDecoderModel(cfg).init_params(jax.random.PRNGKey(0)), cfg, str(VOCAB))
    return path
