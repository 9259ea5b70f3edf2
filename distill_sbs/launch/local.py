"""N processes of one multi-host job on this machine: how to debug multi-host runs without a pod.

    python -m distill_sbs.launch.local --num_processes 2 --cpu_devices 4 -- \\
        python -m distill_sbs.train --gin_file=quickstart.gin --gin.MODEL_DIR="'/tmp/mh'"

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID; `--cpu_devices K` also gives it K simulated CPU devices (JAX_PLATFORMS=cpu, the
processes' collectives go over gloo). Output lines are prefixed with `[process i]`. When one
process fails the others are stopped (a lone survivor would wait on its peers for ever), and the
launcher exits with the first failure's status.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_envs(
    num_processes: int,
    base: Mapping[str, str],
    port: int,
    cpu_devices: int | None = None,
) -> list[dict[str, str]]:
    """The environment of each process of the job."""
    envs = []
    for pid in range(num_processes):
        env = dict(base)
        env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
        env["JAX_NUM_PROCESSES"] = str(num_processes)
        env["JAX_PROCESS_ID"] = str(pid)
        if cpu_devices:
            env["JAX_PLATFORMS"] = "cpu"
            flag = f"--xla_force_host_platform_device_count={cpu_devices}"
            env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), flag) if f)
        envs.append(env)
    return envs


def _relay(pid: int, stream, out) -> None:
    for line in stream:
        out.write(f"[process {pid}] {line}")
        out.flush()


def run_commands(
    commands: Sequence[Sequence[str]],
    envs: Sequence[Mapping[str, str]] | None = None,
    poll_s: float = 0.2,
) -> int:
    """Runs the processes of one job; 0, or the first failing process's status (the others are
    then stopped: they would wait on their peers for ever)."""
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    envs = envs or [os.environ] * len(commands)
    procs = [
        subprocess.Popen(list(c), env=dict(e), **pipe) for c, e in zip(commands, envs, strict=True)
    ]
    relays = [
        threading.Thread(target=_relay, args=(i, p.stdout, sys.stdout), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in relays:
        t.start()
    status = 0
    while [p.poll() for p in procs].count(None):  # poll every process, every round
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and not status:
            status = failed[0]
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(poll_s)
    for t in relays:
        t.join()
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill_sbs.launch.local", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--cpu_devices", type=int, default=None, help="simulated CPU devices each")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m distill_sbs.train ...")
    if args.num_processes < 1:
        parser.error(f"--num_processes={args.num_processes} must be at least 1")
    envs = process_envs(args.num_processes, os.environ, args.port or free_port(), args.cpu_devices)
    return run_commands([command] * len(envs), envs)


if __name__ == "__main__":
    sys.exit(main())
