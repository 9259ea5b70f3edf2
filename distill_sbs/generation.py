"""Batched generation: prompts or token arrays in, generated ids or texts out.

One place for what every caller of `model.generate` needs (the trainer's evaluation, eval, infer,
local teachers and the server): decoding parameters (`GenerationParams`), padding a stream of
inputs to few compiled shapes (`generate_ids` pads to one batch shape; `ModelGenerator` rounds
rows and lengths up to powers of two), counting prompt and completion tokens, and stop strings.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters of one request; part of the cache key."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
        }


def apply_stop(text: str, stop: Sequence[str]) -> str:
    """Cuts `text` at the first occurrence of any stop string (as OpenAI servers do)."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


@dataclasses.dataclass(frozen=True)
class GeneratedText:
    text: str
    prompt_tokens: int
    completion_tokens: int


class Generator(Protocol):
    """Anything that turns a batch of prompts into texts with one set of decoding parameters."""

    max_batch_size: int

    def generate(
        self, prompts: Sequence[str], params: GenerationParams, seed: int = 0
    ) -> list[GeneratedText]: ...


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The smallest power of two >= max(n, minimum), capped at maximum."""
    b = max(1, minimum)
    while b < n:
        b *= 2
    return min(b, maximum) if maximum else b


class ModelGenerator:
    """Greedy decoding (temperature 0) or top-p sampling with a T5 model from distill_sbs.load."""

    def __init__(
        self,
        model: Any,
        params: Any,
        *,
        max_input_length: int = 512,
        max_batch_size: int = 16,
        max_decode_length: int = 256,
    ):
        self.model = model
        self.params = params
        self.max_input_length = max_input_length
        self.max_batch_size = max_batch_size
        self.max_decode_length = max_decode_length
        self._lock = threading.Lock()  # one generate at a time (the device is shared)

    def warmup(self, max_tokens: int) -> int:
        """Compiles greedy decoding for every (rows, input length) bucket; returns the count.

        So that no request waits on the compiler: log2(max_batch_size)+1 row buckets times
        log2(max_input_length/16)+1 length buckets programs, each compiled once.
        """
        import jax

        rows = sorted(
            {bucket(n, 1, self.max_batch_size) for n in range(1, self.max_batch_size + 1)}
        )
        lengths = sorted(
            {bucket(n, 16, self.max_input_length) for n in range(1, self.max_input_length + 1)}
        )
        decode_length = bucket(min(max_tokens, self.max_decode_length), 16)
        for r in rows:
            for length in lengths:
                batch = np.zeros((r, length), np.int32)
                batch[:, 0] = 1
                ids = self.model.generate(
                    self.params, batch, max_decode_length=decode_length, method="greedy"
                )
                jax.block_until_ready(ids)
        return len(rows) * len(lengths)

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs: Any) -> ModelGenerator:
        import distill_sbs

        model, params = distill_sbs.load(path)
        return cls(model, params, **kwargs)

    def generate(
        self, prompts: Sequence[str], params: GenerationParams, seed: int = 0
    ) -> list[GeneratedText]:
        import jax

        if not prompts:
            return []
        if len(prompts) > self.max_batch_size:
            out: list[GeneratedText] = []
            for i in range(0, len(prompts), self.max_batch_size):
                out += self.generate(prompts[i : i + self.max_batch_size], params, seed + i)
            return out
        # Encode at the longest bucket needed, then pad rows and columns to bucketed shapes.
        tokens = np.asarray(self.model.encode_texts(list(prompts), self.max_input_length))
        prompt_lengths = (tokens != 0).sum(axis=1)
        length = bucket(int(prompt_lengths.max()), 16, self.max_input_length)
        rows = bucket(len(prompts), 1, self.max_batch_size)
        batch = np.zeros((rows, length), np.int32)
        batch[: len(prompts)] = tokens[:, :length]
        decode_length = bucket(min(params.max_tokens, self.max_decode_length), 16)
        kwargs: dict[str, Any] = {"max_decode_length": decode_length}
        if params.temperature > 0:
            kwargs.update(
                method="sample",
                temperature=params.temperature,
                top_p=params.top_p,
                rng=jax.random.PRNGKey(seed),
            )
        else:
            kwargs["method"] = "greedy"
        with self._lock:
            ids = np.asarray(self.model.generate(self.params, batch, **kwargs))
        ids = ids[: len(prompts), : params.max_tokens]
        out = []
        for row, n_prompt in zip(ids, prompt_lengths, strict=True):
            # Tokens up to and excluding EOS (id 1); padding (0) after it is not generated text.
            end = np.flatnonzero(row == 1)
            n = int(end[0]) if end.size else int((row != 0).sum())
            text = self.model.decode_tokens(row[None, :n])[0] if n else ""
            out.append(GeneratedText(apply_stop(text, params.stop), int(n_prompt), n))
        return out


def generate_ids(
    model: Any,
    params: Any,
    encoder_input_tokens: np.ndarray,
    *,
    batch_size: int,
    max_decode_length: int,
    **generate_kwargs: Any,
) -> np.ndarray:
    """Generated ids int32 [n, max_decode_length] for int32 [n, length] inputs, in batches padded
    to one compiled shape."""
    out = []
    for start in range(0, len(encoder_input_tokens), batch_size):
        enc = encoder_input_tokens[start : start + batch_size]
        n = len(enc)
        if n < batch_size:
            enc = np.concatenate([enc, np.zeros((batch_size - n,) + enc.shape[1:], enc.dtype)])
        ids = model.generate(params, enc, max_decode_length=max_decode_length, **generate_kwargs)
        out.append(np.asarray(ids)[:n])
    return np.concatenate(out)


def generate_texts(
    model: Any,
    params: Any,
    encoder_input_tokens: np.ndarray,
    *,
    batch_size: int,
    max_decode_length: int,
    **generate_kwargs: Any,
) -> list[str]:
    """Decoded outputs for int32 [n, length] inputs (see generate_ids)."""
    ids = generate_ids(
        model,
        params,
        encoder_input_tokens,
        batch_size=batch_size,
        max_decode_length=max_decode_length,
        **generate_kwargs,
    )
    return model.decode_tokens(ids)
