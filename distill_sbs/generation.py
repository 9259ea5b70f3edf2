"""Batched generation: prompts or token arrays in, generated ids or texts out.

One place for what every caller of `model.generate` needs (the trainer's evaluation, eval, infer,
local teachers and the server): decoding parameters (`GenerationParams`), padding a stream of
inputs to few compiled shapes (`generate_ids` pads to one batch shape; `ModelGenerator` rounds
rows and lengths up to powers of two), counting prompt and completion tokens, and stop strings.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)


def token_text(tokenizer: Any, t: int) -> str:
    """One token's text as logprobs name it (generation and scoring alike): its SentencePiece
    piece as it reads inside a sequence ("\u2581" is a space), or `token_id:N` (vLLM's spelling)
    for an id no piece has (a T5 vocabulary's sentinels and padding, ids 32000-32127)."""
    if t < tokenizer.get_piece_size():
        return tokenizer.id_to_piece(t).replace("\u2581", " ")
    return f"token_id:{t}"


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


TOP_LOGPROBS_MAX = 20  # the most alternatives per token a caller can ask for (OpenAI's bound)


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token: its text piece, log-probability and the best alternatives."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # (piece, logprob), most likely first


@dataclasses.dataclass(frozen=True)
class GeneratedText:
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens of `text`: after a stop string, those it kept
    finish_reason: str = "length"  # "stop" (EOS or a stop string) or "length"
    tokens: tuple[Token, ...] = ()  # with logprobs=True: the tokens of `text`


# on_token(row, text delta, token) -> keep going: called as each row's token is decoded; the
# deltas of a row join to its final text (a tail that may start a stop string is held back).
OnToken = Callable[[int, str, Token], bool]


class Generator(Protocol):
    """Anything that turns a batch of prompts into texts with one set of decoding parameters.

    logprobs: fill GeneratedText.tokens (with TOP_LOGPROBS_MAX alternatives). on_token: stream
    each token as it is decoded; answering False stops that row (a client that went away).
    """

    max_batch_size: int

    def generate(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        seed: int = 0,
        *,
        logprobs: bool = False,
        on_token: OnToken | None = None,
    ) -> list[GeneratedText]: ...


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextTracker:
    """One row's text as its tokens arrive: stop strings, streamed deltas, kept-token count.

    `decode(ids)` is the text of a token prefix; the tracker re-decodes the prefix at each token
    (a piece's text can depend on its neighbours) and emits only what can no longer change.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.tokens: list[Token] = []
        self.sent = ""  # text already emitted
        self.text = ""
        self.stopped = False  # a stop string was found (the row is over)

    def add(self, token_id: int, token: Token) -> str:
        """Adds one token; returns the new text that can be emitted ("" if none)."""
        self.ids.append(token_id)
        self.tokens.append(token)
        full = self.decode(self.ids)
        self.text = apply_stop(full, self.stop)
        if len(self.text) < len(full):
            self.stopped = True
            safe = self.text
        else:
            safe = full[: len(full) - _held_back(full, self.stop)]
        if not safe.startswith(self.sent):
            return ""  # re-decoding changed emitted text; wait until it agrees again
        delta, self.sent = safe[len(self.sent) :], safe
        return delta

    def set_all(self, ids: list[int], tokens: list[Token]) -> None:
        """The whole row at once (not streamed): one decode, and more only if a stop string cut."""
        self.ids, self.tokens = ids, tokens
        full = self.decode(ids)
        self.text = apply_stop(full, self.stop)
        self.stopped = len(self.text) < len(full)

    def flush(self) -> str:
        """The rest of the final text (at the end of the row)."""
        delta = self.text[len(self.sent) :] if self.text.startswith(self.sent) else ""
        self.sent = self.text
        return delta

    def kept_tokens(self) -> int:
        """Tokens that produced returned text: all of them unless a stop string cut the text."""
        if not self.stopped:
            return len(self.ids)
        for j in range(len(self.ids) + 1):
            if len(self.decode(self.ids[:j])) >= len(self.text):
                return j
        return len(self.ids)


@dataclasses.dataclass
class _Stream:
    """One streamed generate call's state, read by the decoder's host callback."""

    on_token: OnToken
    trackers: list[TextTracker]
    max_tokens: int
    error: BaseException | None = None  # what the callback raised (re-raised after the decode)


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
        # The running stream: set and cleared under _lock, and cleared only once the decode that
        # calls back into it has finished (see _run).
        self._streaming: _Stream | None = None
        self._step_callback = self._on_step  # the same bound method each call: one jit key

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

    def prompt_tokens(self, prompt: str) -> int:
        """The encoder input tokens of `prompt`, EOS included (over max_input_length: cut)."""
        return len(self.model.vocabulary.encode(prompt)) + 1

    @classmethod
    def from_checkpoint(cls, path: str, **kwargs: Any) -> ModelGenerator:
        from distill_sbs import models

        model, params = models.load(path)
        return cls(model, params, **kwargs)

    def generate(
        self,
        prompts: Sequence[str],
        params: GenerationParams,
        seed: int = 0,
        *,
        logprobs: bool = False,
        on_token: OnToken | None = None,
    ) -> list[GeneratedText]:
        if not prompts:
            return []
        if len(prompts) > self.max_batch_size:
            out: list[GeneratedText] = []
            for i in range(0, len(prompts), self.max_batch_size):
                chunk = prompts[i : i + self.max_batch_size]
                cb = on_token and (lambda r, d, t, i=i: on_token(r + i, d, t))
                out += self.generate(chunk, params, seed + i, logprobs=logprobs, on_token=cb)
            return out
        # Encode at the longest bucket needed, then pad rows and columns to bucketed shapes.
        tokens = np.asarray(self.model.encode_texts(list(prompts), self.max_input_length))
        prompt_lengths = (tokens != 0).sum(axis=1)
        length = bucket(int(prompt_lengths.max()), 16, self.max_input_length)
        rows = bucket(len(prompts), 1, self.max_batch_size)
        batch = np.zeros((rows, length), np.int32)
        batch[: len(prompts)] = tokens[:, :length]
        trackers = [TextTracker(self._decode, params.stop) for _ in prompts]
        with self._lock:
            ids, lp = self._run(batch, params, seed, logprobs, on_token, trackers)
        out = []
        for r, n_prompt in enumerate(prompt_lengths):
            if on_token is None:  # not streamed: the tracker gets the whole row at once
                row = ids[r, : params.max_tokens].tolist()
                row = row[: next((j for j, t in enumerate(row) if t in (0, 1)), len(row))]
                toks = [self._token(t, lp, r, j) for j, t in enumerate(row)] if lp else []
                trackers[r].set_all(row, toks)
            out.append(self._result(trackers[r], int(n_prompt), params, logprobs))
        return out

    def _run(self, batch, params, seed, logprobs, on_token, trackers):  # noqa: ANN001, ANN202
        """(ids [rows, decode_length], (token_lp, top_ids, top_lp) as numpy or None)."""
        import jax

        decode_length = bucket(min(params.max_tokens, self.max_decode_length), 16)
        kwargs: dict[str, Any] = {"max_decode_length": decode_length, "method": "greedy"}
        if params.temperature > 0:
            kwargs.update(
                method="sample",
                temperature=params.temperature,
                top_p=params.top_p,
                rng=jax.random.PRNGKey(seed),
            )
        if logprobs or on_token is not None:
            kwargs["logprobs_top_k"] = TOP_LOGPROBS_MAX
        stream = None
        if on_token is not None:
            stream = _Stream(on_token, trackers, params.max_tokens)
            kwargs["step_callback"] = self._step_callback  # one callable: one compiled program
        self._streaming = stream
        try:
            result = self.model.generate(self.params, batch, **kwargs)
            # JAX dispatches asynchronously: generate can return while the decoder still calls
            # _on_step, so the stream stays set until the outputs exist (every step's callback
            # feeds the loop's state, so they have all returned by then).
            jax.block_until_ready(result)
        finally:
            self._streaming = None
        if stream is not None and stream.error is not None:
            raise stream.error
        if "logprobs_top_k" not in kwargs:
            return np.asarray(result), None
        ids, *lp = (np.asarray(x) for x in result)
        return ids, lp

    def _on_step(self, i, ids, token_lp, top_ids, top_lp, done):  # noqa: ANN001, ANN202
        """The decoder's host callback while streaming: feeds each live row's tracker.

        It never raises: an exception in an ordered host callback poisons JAX's effect token,
        failing every later decode of the process. A failure stops all rows and is raised by
        _run once the decode is over."""
        stream = self._streaming
        try:
            assert stream is not None, "a decoding step outlived its generate call"
            if stream.error is not None:
                return np.zeros(np.shape(ids), bool)
            return self._feed(stream, ids, token_lp, top_ids, top_lp)
        except Exception as e:  # noqa: BLE001 - re-raised by _run, after the decode
            if stream is not None:
                stream.error = e
            logger.exception("streaming step %s failed", int(i))
            return np.zeros(np.shape(ids), bool)

    def _feed(self, stream: _Stream, ids, token_lp, top_ids, top_lp) -> np.ndarray:  # noqa: ANN001
        """keep bool [rows]: adds each live row's token to its tracker and streams it."""
        on_token, trackers, max_tokens = stream.on_token, stream.trackers, stream.max_tokens
        ids, token_lp, top_ids, top_lp = (np.asarray(x) for x in (ids, token_lp, top_ids, top_lp))
        keep = np.zeros(ids.shape, bool)  # padding rows stop at once
        lp = (token_lp[:, None], top_ids[:, None], top_lp[:, None])
        for r, tracker in enumerate(trackers):
            t = int(ids[r])
            if tracker.stopped or t in (0, 1) or len(tracker.ids) >= max_tokens:
                continue  # already over, EOS now, or past max_tokens (lengths are bucketed)
            delta = tracker.add(t, self._token(t, lp, r, 0))
            go = on_token(r, delta, tracker.tokens[-1])
            keep[r] = go and not tracker.stopped and len(tracker.ids) < max_tokens
        return keep

    def _token(self, t: int, lp: Any, r: int, step: int) -> Token:
        token_lp, top_ids, top_lp = (np.asarray(x) for x in lp)
        top = tuple(
            (self._piece(int(a)), float(b))
            for a, b in zip(top_ids[r, step], top_lp[r, step], strict=True)
        )
        return Token(self._piece(t), float(token_lp[r, step]), top)

    def _piece(self, t: int) -> str:
        tokenizer = getattr(self.model.vocabulary, "tokenizer", None)
        if tokenizer is None:
            return self._decode([t])
        return token_text(tokenizer, t)

    def _decode(self, ids: list[int]) -> str:
        return self.model.decode_tokens(np.asarray([ids], np.int32))[0] if ids else ""

    @staticmethod
    def _result(
        tracker: TextTracker, prompt_tokens: int, params: GenerationParams, logprobs: bool
    ) -> GeneratedText:
        n = tracker.kept_tokens()
        length = not tracker.stopped and n >= params.max_tokens
        return GeneratedText(
            tracker.text,
            prompt_tokens,
            n,
            "length" if length else "stop",
            tuple(tracker.tokens[:n]) if logprobs else (),
        )


def generate_ids(
    model: Any,
    params: Any,
    encoder_input_tokens: np.ndarray,
    *,
    batch_size: int,
    max_decode_length: int,
    rng: Any = None,
    on_batch: Callable[[int], None] | None = None,
    **generate_kwargs: Any,
) -> np.ndarray:
    """Generated ids int32 [n, max_decode_length] for int32 [n, length] inputs, in batches padded
    to one compiled shape.

    rng: sampling's key (a jax PRNG key); each batch draws with it folded with the batch's first
    row, so batches never repeat each other's draws and a rerun agrees. on_batch: called with the
    number of rows done after each batch (progress)."""
    out = []
    for start in range(0, len(encoder_input_tokens), batch_size):
        enc = encoder_input_tokens[start : start + batch_size]
        n = len(enc)
        if n < batch_size:
            enc = np.concatenate([enc, np.zeros((batch_size - n,) + enc.shape[1:], enc.dtype)])
        if rng is not None:
            import jax

            generate_kwargs["rng"] = jax.random.fold_in(rng, start)
        ids = model.generate(params, enc, max_decode_length=max_decode_length, **generate_kwargs)
        out.append(np.asarray(ids)[:n])
        if on_batch is not None:
            on_batch(start + n)
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
