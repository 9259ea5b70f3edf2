"""`python -m distill_sbs.serve` as a test's subprocess on 127.0.0.1, over a tiny random-weight
T5 checkpoint the test saves; and our server in the test's own process (a teacher scored over
HTTP)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator


def save_tiny_checkpoint(path: str, spm: str, seed: int = 0, **overrides) -> str:
    """A native checkpoint of `_tiny_t5.tiny_config(**overrides)` over the SentencePiece `spm`."""
    import jax
    import seqio
    from _tiny_t5 import tiny_config

    from distill_sbs.checkpoints import save_native
    from distill_sbs.models import EncoderDecoderModel

    cfg = tiny_config(**overrides)
    model = EncoderDecoderModel(cfg, seqio.SentencePieceVocabulary(spm, extra_ids=0))
    save_native(path, model.init_params(jax.random.PRNGKey(seed)), cfg, spm, extra_ids=0)
    return path


def start(
    cmd: list[str], env: dict[str, str], timeout: float = 180
) -> tuple[subprocess.Popen, str]:
    """Starts `cmd` (a serve command with --port 0) and returns it with its base URL, read from
    its first line ("serving ... on <url>"); the server's stderr tail if it did not start."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))
    reader.start()
    reader.join(timeout)
    if not line or "serving" not in line[0]:
        proc.kill()
        raise RuntimeError(f"server did not start: {proc.stderr.read()[-2000:]}")
    return proc, line[0].split(" on ")[1].strip()


@contextlib.contextmanager
def serving(
    checkpoint: str, env: dict[str, str], key_env: str, *, max_batch_size: int,
    max_input_length: int, max_tokens_limit: int,
) -> Iterator[str]:  # fmt: skip
    """The server of `checkpoint` behind the key in $key_env, model name "tiny": its base URL."""
    cmd = [
        sys.executable, "-m", "distill_sbs.serve", "--checkpoint", checkpoint, "--port", "0",
        "--max_batch_size", str(max_batch_size), "--max_input_length", str(max_input_length),
        "--max_tokens_limit", str(max_tokens_limit), "--api_key_env", key_env,
        "--model_name", "tiny",
    ]  # fmt: skip
    proc, base_url = start(cmd, env)
    try:
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def tiny_world_teacher(directory: str):
    """(model, params) of a tiny random T5 over the world's SentencePiece (609 pieces, 1,024 ids):
    a teacher with another vocabulary than arith's 256."""
    import distill_sbs
    from distill_sbs.data.world import VOCAB_FILE

    return distill_sbs.load(save_tiny_checkpoint(directory, VOCAB_FILE, vocab_size=1024))


@contextlib.contextmanager
def in_process_server(model_and_params, api_key: str, key_env: str) -> Iterator[str]:
    """Our server over (model, params) in this process on 127.0.0.1, with its key also in the
    environment variable `key_env` (a client's api_key_env) while it runs; yields its base URL."""
    import pytest

    from distill_sbs.generation import ModelGenerator
    from distill_sbs.serve import Server

    gen = ModelGenerator(*model_and_params, max_input_length=128, max_batch_size=8)
    with pytest.MonkeyPatch.context() as mp, Server(gen, api_key=api_key, model_name="tiny") as s:
        mp.setenv(key_env, api_key)
        yield s.base_url
