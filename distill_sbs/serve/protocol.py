"""The OpenAI API's shapes: a POST body validated into a CompletionRequest (`parse_request`), the
response body (`completion_response`), the SSE chunks of a streamed answer (`stream_chunks`) and
the error body (`APIError`). Chat messages become one input text: the text content of every
message, in order, joined by a blank line; roles are dropped, because a student is trained on
plain inputs.

Scoring (teacher forcing), in the shape OpenAI-compatible servers use for it: a completions request
with `echo: true`, `max_tokens: 0` and `logprobs: k` answers the log-probabilities of given text
instead of generating. The model is encoder-decoder, so the scored text is not the prompt: the
prompt is the encoder input and the extra field `decoder_prompt` (one string per prompt, the name
vLLM gives an encoder-decoder model's decoder side) is the target whose tokens (EOS included)
are scored; each choice echoes its decoder_prompt and carries the `logprobs` object of its
tokens (docs/serve.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.responses import JSONResponse

from distill_sbs.generation import TOP_LOGPROBS_MAX, GeneratedText, GenerationParams, Token
from distill_sbs.serve.engine import Job

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An OpenAI-shaped error answer: {"error": {"message", "type", "code", "param"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type,
            code,
            param,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        return JSONResponse({"error": body}, self.status, headers=self.headers)


def server_error(exc: BaseException, what: str) -> APIError:
    """The 500 answer for a failure inside the server: a stable message and a request id, never
    the exception's text, a traceback or a path (they go to the server's log under that id)."""
    rid = "req_" + uuid.uuid4().hex[:24]
    logger.error("%s: %s", rid, what, exc_info=exc)
    return APIError(
        500,
        f"{what} (request id {rid}: the server's log has the details)",
        type="server_error",
        code="internal_error",
        headers={"x-request-id": rid},
    )


class BadRequest(APIError):
    """A request the client must fix: answered 400 with this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(400, message, param=param)


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A validated completion or chat request."""

    chat: bool
    prompts: list[str]  # chat: the one text the messages become
    params: GenerationParams
    n: int  # samples per prompt
    seed: int | None  # None: not given (samples vary)
    model: str | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    logprobs: int | None = None  # alternatives per token (0: the chosen token's only); None: off
    echo: bool = False
    targets: list[str] | None = None  # scoring: the decoder_prompt of each prompt

    def rows(self) -> list[str]:
        """What the generator gets: each prompt n times, samples of a prompt side by side."""
        return [p for p in self.prompts for _ in range(self.n)]


def _text(value: Any, what: str) -> str:
    """`value` if it is a string that UTF-8 can encode (JSON allows lone surrogates)."""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid Unicode (a lone surrogate?)") from None
    return value


def _messages_to_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "content" not in m:
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        content = m["content"]
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            for j, c in enumerate(content):
                kind = c.get("type") if isinstance(c, dict) else None
                if kind != "text":
                    raise BadRequest(
                        f"messages[{i}].content[{j}] is of type {kind!r}: this text-only model "
                        "reads 'text' parts only",
                        "messages",
                    )
            content = "".join(_text(c.get("text"), f"messages[{i}].content[]") for c in content)
        parts.append(_text(content, f"messages[{i}].content"))
    return "\n\n".join(parts)


# Request fields this server cannot honour, with the values that ask for nothing (accepted):
# any other value is a 400 naming the field rather than an answer that silently ignores it.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


def _refuse_unsupported(body: dict[str, Any], n: int) -> None:
    for name, neutral in _UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise BadRequest(f"'{name}' is not supported by this server", name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:  # best_of == n: every sample is returned anyway
        raise BadRequest(f"'best_of' is not supported by this server (only best_of = n = {n})",
                         "best_of")  # fmt: skip


def _prompt_list(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("'prompt' must be a string or a non-empty list of strings", "prompt")
    return [_text(p, "'prompt'") for p in prompts]


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        v = default
    if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}", name)
    return v


def _params(
    body: dict[str, Any], chat: bool, limit: int
) -> tuple[GenerationParams, int, int | None]:
    """(decoding parameters, n, seed); max_tokens above `limit` is clipped to it."""
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = int(_number(body, name, 16, 1 if chat else 0, 1 << 20))
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    n = int(_number(body, "n", 1, 1, 128))
    # Any 64-bit seed is accepted; the generator's PRNG key takes its low 32 bits. None (not
    # given): the engine draws one, so that samples vary from request to request, as OpenAI's do.
    seed = None
    if body.get("seed") is not None:
        seed = int(_number(body, "seed", 0, -(1 << 63), (1 << 64) - 1)) & 0xFFFFFFFF
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")
    stop = [_text(s, "'stop'") for s in stop]
    # top_p 0 keeps only the most likely token (the nucleus always holds it)
    params = GenerationParams(min(max_tokens, limit), temperature, top_p, tuple(stop))
    return params, n, seed


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Alternatives per token asked for: completions `logprobs: k`, chat `logprobs: true` with
    `top_logprobs: k`; None when not asked."""
    if chat:
        if not body.get("logprobs"):
            if body.get("top_logprobs") is not None:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return int(_number(body, "top_logprobs", 0, 0, TOP_LOGPROBS_MAX))
    if body.get("logprobs") is None:
        return None
    return int(_number(body, "logprobs", 0, 0, TOP_LOGPROBS_MAX))


def parse_request(
    raw: bytes, chat: bool, max_tokens_limit: int, max_sequences: int = 1 << 30
) -> CompletionRequest:
    """The request in a POST body; raises BadRequest naming what is wrong."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep
        raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    params, n, seed = _params(body, chat, max_tokens_limit)
    _refuse_unsupported(body, n)
    if chat:
        prompts = [_messages_to_text(body.get("messages"))]
    else:
        prompts = _prompt_list(body.get("prompt"))
    if len(prompts) * n > max_sequences:
        raise BadRequest(
            f"{len(prompts)} prompt(s) x n={n} is more than the {max_sequences} sequences "
            "a request may ask for (--max_sequences_per_request)"
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    logprobs = _logprobs(body, chat)
    echo = bool(body.get("echo")) and not chat
    stream = bool(body.get("stream"))
    targets = _scoring(body, params, prompts, n, stream, echo, logprobs)
    return CompletionRequest(
        chat,
        prompts,
        params,
        n,
        seed,
        model,
        stream,
        stream and bool(options.get("include_usage")),
        logprobs,
        echo,
        targets,
    )


def _scoring(
    body: dict[str, Any],
    params: GenerationParams,
    prompts: list[str],
    n: int,
    stream: bool,
    echo: bool,
    logprobs: int | None,
) -> list[str] | None:
    """The texts to score (decoder_prompt) when the request asks for scoring: echo, max_tokens 0
    and logprobs; None for a generation request. Any other use of these fields is a 400."""
    scoring = params.max_tokens == 0
    if not scoring:
        if echo and logprobs is not None:
            raise BadRequest(
                "'echo' with 'logprobs' scores a text: send 'max_tokens': 0 and the text to "
                "score as 'decoder_prompt' (an encoder-decoder model gives its encoder input, "
                "the prompt, no probabilities)",
                "echo",
            )
        if body.get("decoder_prompt") is not None:
            raise BadRequest(
                "'decoder_prompt' is read only when scoring ('echo': true, 'max_tokens': 0, "
                "'logprobs': k)",
                "decoder_prompt",
            )
        return None
    if not echo or logprobs is None:
        raise BadRequest(
            "'max_tokens': 0 scores a text: it needs 'echo': true and 'logprobs': k", "max_tokens"
        )
    if n != 1 or stream:
        raise BadRequest("scoring ('max_tokens': 0) takes n = 1 and no streaming", "n")
    raw = body.get("decoder_prompt")
    if raw is None:
        raise BadRequest(
            "scoring an encoder-decoder model needs 'decoder_prompt': the text to score, one "
            "per prompt (the prompt is the encoder input)",
            "decoder_prompt",
        )
    targets = [raw] if isinstance(raw, str) else raw
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise BadRequest("'decoder_prompt' must be a string or a list of strings", "decoder_prompt")
    if len(targets) != len(prompts):
        raise BadRequest(
            f"'decoder_prompt' has {len(targets)} text(s) for {len(prompts)} prompt(s)",
            "decoder_prompt",
        )
    return [_text(t, "'decoder_prompt'") for t in targets]


def _logprobs_json(req: CompletionRequest, tokens: Sequence[Token], offset: int) -> Any:
    """The `logprobs` of one choice (or one stream chunk), in the shape of its endpoint."""
    k = req.logprobs or 0
    if req.chat:
        return {
            "content": [
                {
                    "token": t.text,
                    "logprob": t.logprob,
                    "bytes": list(t.text.encode()),
                    "top_logprobs": [
                        {"token": s, "logprob": lp, "bytes": list(s.encode())}
                        for s, lp in t.top[:k]
                    ],
                }
                for t in tokens
            ]
        }
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top[:k]) for t in tokens] if k else None,
        "text_offset": offsets,
    }


def _usage(req: CompletionRequest, outs: Sequence[GeneratedText]) -> dict[str, int]:
    # Each prompt counts once for prompt tokens, however many samples were drawn.
    prompt_tokens = sum(o.prompt_tokens for o in outs[:: req.n])
    completion_tokens = sum(o.completion_tokens for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    req: CompletionRequest, outs: Sequence[GeneratedText], model_name: str
) -> dict[str, Any]:
    """The OpenAI response body for `req` given its rows' outputs (see CompletionRequest.rows)."""
    choices = []
    for i, o in enumerate(outs):
        lp = _logprobs_json(req, o.tokens, 0) if req.logprobs is not None else None
        if req.chat:
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": lp,
            }
        elif req.targets is not None:  # scoring: the echo is the scored text, nothing added
            choice = {"index": i, "text": o.text, "logprobs": lp}
        else:
            prefix = req.prompts[i // req.n] if req.echo else ""
            choice = {"index": i, "text": prefix + o.text, "logprobs": lp}
        choice["finish_reason"] = o.finish_reason
        choices.append(choice)
    return {
        "id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": _usage(req, outs),
    }


def _chunk(req: CompletionRequest, cid: str, model: str, choices: list, usage=None) -> bytes:  # noqa: ANN001
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if req.include_usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _chunk_choice(req: CompletionRequest, i: int, text: str, tokens: list, finish=None) -> dict:  # noqa: ANN001
    """One choice of a stream chunk: a text delta, its tokens' logprobs, a finish reason."""
    lp = _logprobs_json(req, tokens, 0) if req.logprobs is not None and tokens else None
    if req.chat:
        return {
            "index": i,
            "delta": {"content": text} if text else {},
            "logprobs": lp,
            "finish_reason": finish,
        }
    return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}


async def stream_chunks(
    req: CompletionRequest,
    events: asyncio.Queue,
    job: Job,
    model_name: str,
) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request: one chunk per token as the decoder makes it (events
    (row, delta, token) from `job.on_token`, None when the job is over), a last chunk per choice
    with its finish reason, usage when asked, then `data: [DONE]`. Closing it cancels the job."""
    cid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
    sent = [""] * len(req.rows())
    try:
        for i in range(len(sent)):
            first = {"role": "assistant", "content": ""} if req.chat else None
            if req.chat:
                yield _chunk(
                    req,
                    cid,
                    model_name,
                    [{"index": i, "delta": first, "logprobs": None, "finish_reason": None}],
                )
            elif req.echo:
                prompt = req.prompts[i // req.n]
                yield _chunk(req, cid, model_name, [_chunk_choice(req, i, prompt, [])])
        while (event := await events.get()) is not None:
            row, delta, token = event
            if delta or req.logprobs is not None:
                sent[row] += delta
                yield _chunk(req, cid, model_name, [_chunk_choice(req, row, delta, [token])])
        try:
            outs = job.future.result()
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            error = server_error(e, "generation failed")
            err = {"message": error.message, "type": error.type, "code": error.code}
            yield b"data: " + json.dumps({"error": err}).encode() + b"\n\n"
            return
        for i, o in enumerate(outs):
            rest = o.text[len(sent[i]) :] if o.text.startswith(sent[i]) else ""
            yield _chunk(req, cid, model_name, [_chunk_choice(req, i, rest, [], o.finish_reason)])
        if req.include_usage:
            yield _chunk(req, cid, model_name, [], _usage(req, outs))
        yield b"data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left mid-stream stops its rows
