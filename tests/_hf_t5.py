"""Shared helpers for the network / decoding / conversion tests: tiny random HF T5 oracles."""

from __future__ import annotations

import numpy as np
import torch
import transformers

# Tiny shapes: heads, d_ff and vocab divisible by 4 (model axis of the sharding test); 8 buckets
# with max distance 16 so that sequences of ~20 tokens reach the logarithmic buckets.
TINY = dict(
    vocab_size=128,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
VARIANTS = {
    "t5_1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # uneven stacks and another activation, to catch encoder/decoder mix-ups
    "t5_1_1_3dec_silu": dict(
        feed_forward_proj="gated-silu", tie_word_embeddings=False, num_decoder_layers=3
    ),
}


def make_hf_model(variant: str, seed: int = 0, eos_bias: float = 0.0):
    """A random HF T5ForConditionalGeneration in eval mode, every tensor randomised.

    eos_bias > 0 makes the EOS logit about eos_bias on typical decoder states, so that decoding
    tests see sequences end early.
    """
    torch.manual_seed(seed)
    config = transformers.T5Config(**TINY, **VARIANTS[variant])
    model = transformers.T5ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if not VARIANTS[variant]["tie_word_embeddings"]:
            # transformers 5 ties lm_head to the embedding at construction; untie it
            model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name in ("shared.weight", "lm_head.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        if eos_bias:
            # point the EOS output row along the mean decoder state, so EOS wins on some steps
            enc = torch.randint(2, config.vocab_size, (4, 12), generator=gen)
            dec = torch.randint(2, config.vocab_size, (4, 8), generator=gen)
            out = model(input_ids=enc, decoder_input_ids=dec, output_hidden_states=True)
            h = out.decoder_hidden_states[-1].mean((0, 1))
            if config.scale_decoder_outputs:
                h = h * config.d_model**-0.5
            model.lm_head.weight[1] = eos_bias * h / h.norm() ** 2
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(model, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc > 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
        )
    return out.logits.numpy()


def hf_generate(model, enc: np.ndarray, max_new_tokens: int, num_beams: int = 1) -> np.ndarray:
    """HF generate without its start token, 0 after EOS, zero-padded to max_new_tokens.

    (HF beam search fills finished rows with EOS rather than pad when pad_token_id is 0.)
    """
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(enc, dtype=torch.long),
            attention_mask=torch.tensor(enc > 0, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=num_beams,
            length_penalty=1.0,
            early_stopping=False,
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        ).numpy()[:, 1:]
    after_eos = np.cumsum(np.cumsum(out == 1, 1), 1) > 1
    out = np.where(after_eos, 0, out)
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])))


def random_tokens(rng: np.random.Generator, lengths: list[int], width: int, vocab: int = 128):
    """Rows of random ids in [2, vocab) ending with EOS, zero padded to width."""
    out = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        out[i, : n - 1] = rng.integers(2, vocab, n - 1)
        out[i, n - 1] = 1
    return out
