"""A teacher's top-k log-probabilities, scored offline: the side of logit distillation that runs
before training (the train step's side is distillation.py).

Every target token of a registered task's split is scored by teacher forcing (temperature 1), as
training tokenizes it, and data/topk.py's file is written (`python -m distill_sbs.annotate_topk`):

    write_topk              from a local T5 (native checkpoint, MODEL_DIR or Hugging Face folder)
    write_topk_from_server  from an OpenAI-compatible encoder-decoder server (`python -m
                            distill_sbs.serve` over the teacher) that scores given text: `echo`,
                            `max_tokens: 0`, `logprobs: k`, the targets as `decoder_prompt`
    write_pieces_from_server  a teacher with another tokenizer: its top-k in its own pieces,
                            into cross_tokenizer's pieces file (our server, or a decoder-only
                            one such as vLLM scoring input + " " + target)
    TeacherForcedTopK       the scoring itself, shared by write_topk and the server's scoring
                            requests (serve/engine.py): both give the same numbers

A server answers token strings: each is mapped back to the student's vocabulary id (SentencePiece
piece, a space for "\u2581"; `token_id:N` for an id no piece has), and the scored tokens must be
the student's tokenization of the target (EOS included), else ServerTopKError names the example
(the server's tokenizer is another one). For that file only encoder-decoder servers serve: a
decoder-only server scores prompt + target as one text, whose tokens at the boundary need not be
the target's own tokens, and no decoder-only LLM shares the student's T5 vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_sbs import data
from distill_sbs.data import topk as topk_file
from distill_sbs.errors import UserError
from distill_sbs.generation import GenerationParams
from distill_sbs.teachers.backends import (
    Completion,
    HTTPConfig,
    OpenAIBackend,
    RequestFailed,
    TeacherRequest,
)


def task_examples(mixture_or_task_name: str, split: str) -> list[dict[str, Any]]:
    """Tokenized examples of every objective, as training reads them (untrimmed, unshuffled):
    dicts with "id", "objective" (name), "inputs" and "targets" (int lists, EOS included) and
    "inputs_text" / "targets_text" (the texts they were tokenized from, for a teacher server;
    None where the task's tokenizer kept no `*_pretokenized` copy)."""
    import seqio

    names = [o.name for o in data.get_objectives(mixture_or_task_name)]
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    out = []
    for task in tasks:
        ds = task.get_dataset(
            sequence_length={"inputs": 1 << 16, "targets": 1 << 16},
            split=split,
            shuffle=False,
            num_epochs=1,
            use_cached=False,
        )
        for ex in ds.as_numpy_iterator():
            out.append(
                {
                    "id": ex["id"].decode(),
                    "objective": names[int(ex["objective_id"][0])],
                    "inputs": ex["inputs"].tolist(),
                    "targets": ex["targets"].tolist(),
                    "inputs_text": _text(ex.get("inputs_pretokenized")),
                    "targets_text": _text(ex.get("targets_pretokenized")),
                }
            )
    return out


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class TeacherForcedTopK:
    """A T5's teacher-forced log_softmax (temperature 1) over given target tokens: per target
    token, its own log-probability and the k most likely next tokens (ids, log-probs, best
    first). Shared by `write_topk` and the server's scoring requests (serve/engine.py), so both
    give the same numbers for the same tokens."""

    def __init__(self, model: Any, params: Any, k: int) -> None:
        vocab = model.config.vocab_size
        if not 0 < k <= vocab:
            raise UserError(f"top-k: k={k} must be in [1, {vocab}]")
        self.model, self.params, self.k = model, params, k

        @jax.jit
        def top(p: Any, enc: jax.Array, dec_in: jax.Array, tgt: jax.Array) -> tuple:
            logp = jax.nn.log_softmax(model.logits(p, enc, dec_in), axis=-1)
            lp, ids = jax.lax.top_k(logp, k)
            return ids, lp, jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]

        self._top = top

    def __call__(
        self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], rows: int = 0
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(top ids [T, k], top log-probs [T, k], target log-probs [T]) per (inputs, targets)
        pair (EOS included in both); `rows` pads the batch to that many rows (fewer shapes)."""
        pad_rows = max(rows - len(inputs), 0)
        enc = _pad([*inputs, *[[1]] * pad_rows])
        tgt = _pad([*targets, *[[1]] * pad_rows])
        dec_in = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
        ids, lp, token_lp = jax.device_get(self._top(self.params, enc, dec_in, tgt))
        return [
            (ids[r, : len(t)], lp[r, : len(t)], token_lp[r, : len(t)])
            for r, t in enumerate(targets)
        ]


def write_topk(
    model: Any,
    params: Any,
    mixture_or_task_name: str,
    output: str,
    *,
    k: int,
    split: str = "train",
    batch_size: int = 32,
) -> float:
    """Scores every target token of a registered task's `split` with a local teacher (teacher
    forcing, temperature 1) and saves its top-k log-probabilities (data/topk.py); returns the
    file's bytes per target token."""
    examples = task_examples(mixture_or_task_name, split)
    scorer = TeacherForcedTopK(model, params, k)
    entries = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        scored = scorer([e["inputs"] for e in chunk], [e["targets"] for e in chunk])
        for e, (ids, lp, _) in zip(chunk, scored, strict=True):
            entries.append((e["id"], e["objective"], e["targets"], ids, lp))
    return _save(output, entries, model.config.vocab_size)


def _save(
    output: str,
    entries: Sequence[tuple[str, str, Sequence[int], np.ndarray, np.ndarray]],
    vocab_size: int,
) -> float:
    """Writes the (id, objective, targets, top ids, top log-probs) entries (data/topk.py) and
    returns the file's bytes per target token: the one writer of local and server teachers."""
    topk_file.save(output, entries, vocab_size)
    return topk_file.bytes_per_token(output)


class ServerTopKError(UserError):
    """A server's answer that cannot be the student's top-k (tokenizer mismatch, short top-k)."""


@dataclasses.dataclass(frozen=True)
class ScoreRequest(TeacherRequest):
    """One scoring request: the encoder inputs (`prompts`) and the targets to score."""

    prompts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Scores(Completion):
    """A scoring answer: each choice's `logprobs` object, in prompt order."""

    logprobs: tuple[dict[str, Any], ...] = ()


class ScoringBackend(OpenAIBackend):
    """The OpenAI client of teachers/backends.py (concurrency, retries, Retry-After, key
    redaction) asking for scores instead of completions: legacy completions with `echo`,
    `max_tokens: 0`, `logprobs: k` and the targets as `decoder_prompt`."""

    def __init__(self, config: HTTPConfig, k: int) -> None:
        super().__init__(config)
        self.k = k

    def _body(self, req: TeacherRequest) -> dict[str, Any]:
        assert isinstance(req, ScoreRequest)
        return {
            "model": self.config.model,
            "prompt": list(req.prompts),
            "decoder_prompt": list(req.targets),
            "echo": True,
            "max_tokens": 0,
            "logprobs": self.k,
            "temperature": 0,
        }

    def _parse(self, req: TeacherRequest, data: Any) -> Completion:
        choices = sorted(data["choices"], key=lambda c: c["index"])
        logprobs = tuple(c["logprobs"] for c in choices)
        if len(logprobs) != len(req.prompts) or not all(isinstance(x, dict) for x in logprobs):
            raise TypeError("one choice with a logprobs object per prompt expected")
        usage = data.get("usage") or {}
        return Scores("", int(usage.get("prompt_tokens") or 0), 0, logprobs=logprobs)


class TokenMap:
    """The server's token strings -> the student's ids (its SentencePiece vocabulary)."""

    def __init__(self, vocabulary: Any, vocab_size: int) -> None:
        self.tokenizer = getattr(vocabulary, "tokenizer", None)
        if self.tokenizer is None:
            raise ServerTopKError("--teacher_url needs a task with a SentencePiece vocabulary")
        self.vocab_size = vocab_size
        self.unk = self.tokenizer.unk_id()

    def __call__(self, token: str, where: str) -> int:
        number = token.removeprefix("token_id:")
        if number != token and number.isdigit() and int(number) < self.vocab_size:
            return int(number)
        piece = token.replace(" ", "\u2581")
        i = self.tokenizer.piece_to_id(piece)
        if i == self.unk and piece != self.tokenizer.id_to_piece(self.unk):
            raise ServerTopKError(
                f"{where}: the server's token {token!r} is not in the student's vocabulary: the "
                "server's tokenizer differs from the student's"
            )
        return i


def _best_k(top: Any, k: int, where: str, j: int) -> list[tuple[str, float]]:
    """The k most likely (token, log-prob) of the server's top_logprobs at target token j, best
    first (stable: the server's order among ties); ServerTopKError if it gave fewer than k."""
    if not isinstance(top, dict) or len(top) < k:
        raise ServerTopKError(
            f"{where}: the server gave {len(top) if isinstance(top, dict) else 'no'} top "
            f"log-probabilities at target token {j}, k={k} were asked for"
        )
    return [(t, float(lp)) for t, lp in sorted(top.items(), key=lambda kv: -float(kv[1]))[:k]]


def _server_chunks(
    mixture_or_task_name: str,
    split: str,
    batch_size: int,
    examples: Sequence[dict[str, Any]] | None = None,
) -> list[Sequence[dict[str, Any]]]:
    """The task's examples (or `examples`) in requests of batch_size; each must keep its input
    and target text, which is what a server is sent."""
    if examples is None:
        examples = task_examples(mixture_or_task_name, split)
    if any(e["inputs_text"] is None or e["targets_text"] is None for e in examples):
        raise ServerTopKError(
            f"{mixture_or_task_name}: its examples keep no inputs_/targets_pretokenized text "
            "to send to a server"
        )
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


def _entry(example: dict[str, Any], logprobs: dict[str, Any], k: int, tokens: TokenMap) -> tuple:
    """(id, objective, targets, ids [T, k], log-probs [T, k]) of one example's answer."""
    where = f"example {example['id']!r} ({example['objective']})"
    scored = [tokens(t, where) for t in logprobs.get("tokens") or []]
    if scored != example["targets"]:
        raise ServerTopKError(
            f"{where}: the server scored the tokens {scored} but the student tokenizes the target "
            f"as {example['targets']} (EOS included): the server's tokenizer differs"
        )
    tops = logprobs.get("top_logprobs") or []
    ids = np.zeros((len(scored), k), np.int64)
    lps = np.zeros((len(scored), k), np.float32)
    for j, top in enumerate(tops if len(tops) == len(scored) else [None] * len(scored)):
        best = _best_k(top, k, where, j)
        ids[j] = [tokens(t, where) for t, _ in best]
        lps[j] = [float(lp) for _, lp in best]
    return example["id"], example["objective"], example["targets"], ids, lps


def write_topk_from_server(
    config: HTTPConfig,
    mixture_or_task_name: str,
    output: str,
    *,
    k: int,
    split: str = "train",
    batch_size: int = 16,
    vocab_size: int | None = None,
) -> float:
    """`write_topk` with the teacher behind an OpenAI-compatible encoder-decoder
    server: the same file, from the server's top-k of each example's target given its input.
    Returns the file's bytes per target token; ServerTopKError for an answer that does not fit
    the student's tokenization, RuntimeError for a request that failed for good."""
    import seqio

    chunks = _server_chunks(mixture_or_task_name, split, batch_size)
    vocabulary = (
        seqio.get_mixture_or_task(mixture_or_task_name).output_features["targets"].vocabulary
    )
    tokens = TokenMap(vocabulary, vocab_size or vocabulary.vocab_size)
    entries = []
    for chunk, answer in zip(
        chunks, _score(ScoringBackend(config, k), chunks, config), strict=True
    ):
        entries += [_entry(e, lp, k, tokens) for e, lp in zip(chunk, answer.logprobs, strict=True)]
        _check_prompt_tokens(answer, chunk)  # after the targets: their error names the example
    return _save(output, entries, tokens.vocab_size)


PROMPT_SEPARATOR = " "  # decoder-only: between input and target; the target's first piece has it


class PiecesBackend(ScoringBackend):
    """ScoringBackend for a teacher with another tokenizer: the answer is kept in the teacher's
    pieces. An encoder-decoder server (ours) scores the target as `decoder_prompt`; a decoder-only
    one (vLLM) scores input + " " + target as one prompt (`echo`, `max_tokens: 1`: some servers
    refuse 0; the generated token is dropped). A choice without logprobs is kept as None, so
    that the error names its example."""

    def __init__(self, config: HTTPConfig, k: int, decoder_only: bool) -> None:
        super().__init__(config, k)
        self.decoder_only = decoder_only

    def _body(self, req: TeacherRequest) -> dict[str, Any]:
        if not self.decoder_only:
            return super()._body(req)
        assert isinstance(req, ScoreRequest)
        prompts = [
            f"{p}{PROMPT_SEPARATOR}{t}" for p, t in zip(req.prompts, req.targets, strict=True)
        ]
        return {"model": self.config.model, "prompt": prompts, "echo": True, "max_tokens": 1,
                "logprobs": self.k, "temperature": 0}  # fmt: skip

    def _parse(self, req: TeacherRequest, data: Any) -> Completion:
        choices = sorted(data["choices"], key=lambda c: c["index"])
        if len(choices) != len(req.prompts):
            raise TypeError("one choice per prompt expected")
        return Scores("", 0, 0, logprobs=tuple(c.get("logprobs") for c in choices))


def _pieces_entry(
    example: dict[str, Any], logprobs: dict[str, Any] | None, k: int, decoder_only: bool
) -> Any:
    """The cross_tokenizer.Entry of one example's answer, checked."""
    from distill_sbs import cross_tokenizer

    where = f"example {example['id']!r} ({example['objective']})"
    target = example["targets_text"]
    if not isinstance(logprobs, dict) or not logprobs.get("tokens"):
        raise ServerTopKError(
            f"{where}: the server returned no logprobs: it must score the text (completions "
            "with 'echo' and 'logprobs', as vLLM and distill_sbs.serve do)"
        )
    tokens, lps = list(logprobs["tokens"]), list(logprobs.get("token_logprobs") or [])
    tops = list(logprobs.get("top_logprobs") or [])
    if decoder_only:  # keep the target's tokens: from the input's end to the generated one
        offsets = list(logprobs.get("text_offset") or [])
        start, end = len(example["inputs_text"]), len(example["inputs_text"]) + 1 + len(target)
        if start not in offsets:  # as pieces that do not spell the target: not aligned
            raise cross_tokenizer.CrossTokenizerError(
                f"{where}: no teacher token starts where the input ends (character {start}): a "
                "piece straddles the input and the target"
            )
        keep = [j for j, o in enumerate(offsets) if start <= o < end]
        tokens, lps, tops = ([x[j] for j in keep] for x in (tokens, lps, tops))
    spans = cross_tokenizer.piece_spans(tokens, target, where)
    if len(lps) != len(tokens) or any(lp is None for lp in lps):
        raise ServerTopKError(f"{where}: the server returned no logprob for some target token")
    best = tuple(
        tuple(_best_k(tops[j] if j < len(tops) else None, k, where, j)) for j in range(len(tokens))
    )
    lps = tuple(float(x) for x in lps)
    return cross_tokenizer.Entry(
        example["id"], example["objective"], target, tuple(tokens), tuple(spans), lps, best
    )


def write_pieces_from_server(
    config: HTTPConfig,
    mixture_or_task_name: str,
    output: str,
    *,
    k: int,
    split: str = "train",
    batch_size: int = 16,
    decoder_only: bool = False,
    examples: Sequence[dict[str, Any]] | None = None,
) -> int:
    """The teacher's top-k in its own tokenizer (a teacher with another tokenizer), written as
    cross_tokenizer's pieces file: per target its pieces, their character spans in the target
    text, their log-probs and the top-k {piece: log-prob} of each position. `examples` (of
    task_examples) scores those only. Returns the number of entries; ServerTopKError for an
    answer that does not fit, RuntimeError for a request that failed for good."""
    from distill_sbs import cross_tokenizer

    chunks = _server_chunks(mixture_or_task_name, split, batch_size, examples)
    entries = score_pieces(config, chunks, k=k, decoder_only=decoder_only)
    cross_tokenizer.save(output, entries)
    return len(entries)


def score_pieces(
    config: HTTPConfig,
    chunks: Sequence[Sequence[dict[str, Any]]],
    *,
    k: int,
    decoder_only: bool = False,
    skip_uncovered: bool = False,
) -> list[Any]:
    """One scoring request per chunk of examples (id, objective, inputs_text, targets_text): each
    example's cross_tokenizer.Entry in the teacher's pieces; the one client of the pieces file
    and of on-policy scoring in training (distillation.ServedTeacher). skip_uncovered: None for
    an example whose target the teacher's pieces do not spell (CrossTokenizerError otherwise).
    ServerTopKError for an answer without logprobs or with too few; RuntimeError (naming the
    URL) for a request that failed for good."""
    from distill_sbs import cross_tokenizer

    answers = _score(PiecesBackend(config, k, decoder_only), chunks, config)
    out = []
    for chunk, answer in zip(chunks, answers, strict=True):
        for e, lp in zip(chunk, answer.logprobs, strict=True):
            try:
                out.append(_pieces_entry(e, lp, k, decoder_only))
            except cross_tokenizer.CrossTokenizerError:
                if not skip_uncovered:
                    raise
                out.append(None)
    return out


def score_samples(server: Any, chunks: Sequence[Sequence[dict[str, Any]]]) -> list[Any]:
    """score_pieces with the settings of a distillation.TeacherServer (KD.server): the scorer of
    on-policy samples in training (train.setup hands it to distillation.build_teacher); None for
    a sample whose target the teacher's pieces do not spell."""
    config = HTTPConfig(
        server.url,
        server.model,
        api_key_env=server.api_key_env,
        max_concurrency=server.max_concurrency,
        max_retries=server.max_retries,
        timeout=server.timeout,
    )
    return score_pieces(
        config, chunks, k=server.k, decoder_only=server.decoder_only, skip_uncovered=True
    )


def _score(
    backend: ScoringBackend, chunks: Sequence[Sequence[dict[str, Any]]], config: HTTPConfig
) -> list[Scores]:
    """One scoring request per chunk; RuntimeError naming the examples of one that failed."""
    answers: dict[str, Scores | RequestFailed] = {}
    reqs = [_request(i, chunk) for i, chunk in enumerate(chunks)]
    try:
        backend.run(reqs, lambda req, result: answers.__setitem__(req.key, result))
    finally:
        backend.close()
    out = []
    for req, chunk in zip(reqs, chunks, strict=True):
        answer = answers[req.key]
        if isinstance(answer, RequestFailed):
            raise RuntimeError(
                f"{config.base_url}: scoring examples {chunk[0]['id']!r}..{chunk[-1]['id']!r} "
                f"failed: {answer}"
            )
        out.append(answer)
    return out


def _check_prompt_tokens(answer: Scores, chunk: Sequence[dict[str, Any]]) -> None:
    """The encoder side, which the answer does not list: the usage our server reports (input +
    target tokens, EOS included) must be the student's count."""
    want = sum(len(e["inputs"]) + len(e["targets"]) for e in chunk)
    if answer.prompt_tokens and answer.prompt_tokens != want:
        raise ServerTopKError(
            f"examples {chunk[0]['id']!r}..{chunk[-1]['id']!r}: the server counts "
            f"{answer.prompt_tokens} input + target tokens, the student's tokenizer {want}: the "
            "server's tokenizer differs"
        )


def _request(i: int, chunk: Sequence[dict[str, Any]]) -> ScoreRequest:
    prompts = tuple(e["inputs_text"] for e in chunk)
    targets = tuple(e["targets_text"] for e in chunk)
    return ScoreRequest(f"chunk-{i}", "", GenerationParams(0), 0, prompts, targets)


def _pad(rows: Sequence[Sequence[int]], multiple: int = 16) -> np.ndarray:
    """int32 [len(rows), L]: rows right-padded with 0 to a multiple of `multiple` (few shapes,
    few compilations)."""
    length = -(-max(len(r) for r in rows) // multiple) * multiple
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
