"""Load test of `python -m distill_sbs.serve` on loopback: fairness, throughput, memory.

    python benchmarks/serve_load.py [--clients 64] [--small_per_client 8] [--memory_requests 10000]

Starts the server (a subprocess) over a tiny random-weight T5 checkpoint written to a temporary
directory, then runs, all bounded in count and in time (--max_seconds per phase):

  A. baseline: --clients threads each send --small_per_client small requests, one after another
     (keep-alive sessions);
  B. the same small workload while huge requests (--huge_prompts prompts x n=4) are kept in
     flight one after another, and --slow_loris connections drip header bytes;
  C. memory: --memory_requests small requests from the same clients; the server's RSS (from
     /proc) before and after.

Prints and writes (--output) throughput and p50/p99 latency of the small requests in A and B,
the huge requests' latency, what became of the slow-loris connections, RSS before/after C, and
the machine's load average at the start and end (the machine may be shared).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
from absl import app, flags

_CLIENTS = flags.DEFINE_integer("clients", 64, "Concurrent clients sending small requests.")
_SMALL = flags.DEFINE_integer("small_per_client", 8, "Small requests per client in A and B.")
_HUGE_PROMPTS = flags.DEFINE_integer("huge_prompts", 64, "Prompts of a huge request (n=4 each).")
_SLOW_LORIS = flags.DEFINE_integer("slow_loris", 8, "Connections that drip headers during B.")
_MEMORY = flags.DEFINE_integer("memory_requests", 10000, "Small requests for the RSS check (C).")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 300, "Each phase stops after this long.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_size", 16, "The server's --max_batch_size.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures here as JSON.")

SMALL = {"prompt": "12 + 7 =", "max_tokens": 8, "temperature": 0}


def _write_checkpoint(path: str) -> None:
    import jax
    import seqio

    from distill_sbs.checkpoints import save_native
    from distill_sbs.data.vocab import ARITH_SPM
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.network import T5Config

    cfg = T5Config(vocab_size=256, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
                   num_encoder_layers=2, num_decoder_layers=2)  # fmt: skip
    model = EncoderDecoderModel(cfg, seqio.SentencePieceVocabulary(ARITH_SPM, extra_ids=0))
    save_native(path, model.init_params(jax.random.PRNGKey(0)), cfg, ARITH_SPM, extra_ids=0)


def _start_server(checkpoint: str) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable, "-m", "distill_sbs.serve", "--checkpoint", checkpoint, "--port", "0",
        "--model_name", "tiny", "--max_batch_size", str(_MAX_BATCH.value),
        "--max_input_length", "64", "--max_tokens_limit", "16",
        "--max_sequences_per_request", "1024", "--max_queued_sequences", "8192",
        "--max_connections", "1024", "--header_timeout_s", "5",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split(" on ")[1].strip()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _small_clients(url: str, clients: int, per_client: int, deadline: float) -> list[float]:
    """Latencies (s) of the small requests of `clients` threads, `per_client` each."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as s:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                t0 = time.monotonic()
                r = s.post(url + "/completions", json=SMALL, timeout=120)
                dt = time.monotonic() - t0
                with lock:
                    (latencies.append(dt) if r.status_code == 200 else errors.append(r.text))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} small requests failed, e.g. {errors[0][:300]}")
    return latencies


def _stats(latencies: list[float], seconds: float) -> dict[str, float]:
    a = np.asarray(latencies)
    return {
        "requests": len(a),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(a) / seconds, 1),
        "p50_ms": round(float(np.percentile(a, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(a, 99)) * 1000, 1),
    }


def _slow_loris(port: int, n: int, stop: threading.Event, closed: list[int]) -> None:
    """n connections that send a header byte per second until the server closes them."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for s in socks:
        s.setblocking(False)
    alive = list(range(n))
    t_end = time.monotonic() + 8  # past the server's 5 s header timeout, however short phase B
    while alive and (not stop.is_set() or time.monotonic() < t_end):
        for i in list(alive):
            try:
                socks[i].send(b"X")
                if socks[i].recv(1) == b"":
                    raise ConnectionResetError
            except BlockingIOError:
                continue
            except OSError:
                alive.remove(i)
                closed.append(i)
        time.sleep(1.0)
    for s in socks:
        s.close()


def _phase_b(url: str, port: int, deadline: float) -> dict:
    stop, closed, huge = threading.Event(), [], []
    body = {"prompt": [f"{i} + {i} =" for i in range(_HUGE_PROMPTS.value)], "n": 4,
            "max_tokens": 8, "temperature": 0}  # fmt: skip

    def huge_loop() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                t0 = time.monotonic()
                r = s.post(url + "/completions", json=body, timeout=600)
                assert r.status_code == 200, r.text[:300]
                huge.append(time.monotonic() - t0)

    loris = threading.Thread(target=_slow_loris, args=(port, _SLOW_LORIS.value, stop, closed))
    loris.start()
    hugo = threading.Thread(target=huge_loop)
    hugo.start()
    time.sleep(0.5)  # the first huge request is in flight
    t0 = time.monotonic()
    lat = _small_clients(url, _CLIENTS.value, _SMALL.value, deadline)
    out = _stats(lat, time.monotonic() - t0)
    stop.set()
    hugo.join()
    loris.join()
    out["huge_requests"] = len(huge)
    out["huge_sequences_each"] = 4 * _HUGE_PROMPTS.value
    out["huge_latency_s"] = [round(x, 2) for x in huge]
    out["slow_loris_closed_by_server"] = f"{len(closed)}/{_SLOW_LORIS.value}"
    return out


def main(argv) -> None:
    del argv
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "tiny")
        _write_checkpoint(ckpt)
        proc, url = _start_server(ckpt)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        try:
            # Warm-up (not timed): one batch of each row bucket compiles every shape used.
            for k in (1, 2, 4, 8, 16, 32):
                warm = dict(SMALL, prompt=[SMALL["prompt"]] * k)
                assert requests.post(url + "/completions", json=warm, timeout=600).ok
            budget = _MAX_SECONDS.value
            t0 = time.monotonic()
            a = _stats(_small_clients(url, _CLIENTS.value, _SMALL.value, t0 + budget),
                       time.monotonic() - t0)  # fmt: skip
            b = _phase_b(url, port, time.monotonic() + budget)
            rss0 = _rss_mb(proc.pid)
            per = -(-_MEMORY.value // _CLIENTS.value)
            t0 = time.monotonic()
            c = _stats(_small_clients(url, _CLIENTS.value, per, t0 + budget),
                       time.monotonic() - t0)  # fmt: skip
            c.update(rss_before_mb=round(rss0, 1), rss_after_mb=round(_rss_mb(proc.pid), 1))
            alive = requests.get(url.rsplit("/v1", 1)[0] + "/health", timeout=10).status_code
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {
        "clients": _CLIENTS.value,
        "max_batch_size": _MAX_BATCH.value,
        "A_small_alone": a,
        "B_small_with_huge_in_flight": b,
        "p99_ratio_B_over_A": round(b["p99_ms"] / a["p99_ms"], 2),
        "C_memory": c,
        "health_after": alive,
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
