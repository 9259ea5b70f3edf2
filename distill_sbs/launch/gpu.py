"""Multi-host GPU launcher: a SLURM batch job, or plain ssh to a list of hosts.

    python -m distill_sbs.launch.gpu slurm --nodes 2 --gpus_per_node 8 --time 24:00:00 \\
        --partition gpu --dry_run -- --gin_file=paper/base.gin ... --gin.MODEL_DIR="'/shared/run'"
    python -m distill_sbs.launch.gpu ssh --hosts gpu1,gpu2 --workdir /shared/distill_sbs \\
        --dry_run -- --gin_file=...

One process per host drives all of its GPUs. `slurm` writes a batch script (printed with
--dry_run, else submitted with sbatch): the coordinator is the job's first node (from
SLURM_JOB_NODELIST), JAX_NUM_PROCESSES is SLURM_NNODES and each task's JAX_PROCESS_ID its
SLURM_PROCID; `--requeue` lets SLURM restart a pre-empted job, which resumes from MODEL_DIR.
`ssh` starts the same command on every host, the first one as coordinator. MODEL_DIR must be
storage every host sees (a shared file system or gs://).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

from distill_sbs import storage

DEFAULT_PORT = 12355


def train_argv(flags: Sequence[str], python: str = "python3") -> list[str]:
    return [python, "-m", "distill_sbs.train", *flags]


def slurm_script(
    flags: Sequence[str],
    *,
    nodes: int,
    gpus_per_node: int,
    time: str,
    job_name: str = "distill_sbs",
    partition: str | None = None,
    port: int = DEFAULT_PORT,
    output: str = "%x-%j.out",
    requeue: bool = False,
    setup: str | None = None,
) -> str:
    """The sbatch script of a job of `nodes` hosts, one task per host."""
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={output}",
    ]
    head += [f"#SBATCH --partition={partition}"] if partition else []
    head += ["#SBATCH --requeue"] if requeue else []
    body = [
        "set -euo pipefail",
        *([setup] if setup else []),
        # sed reads the whole list: `head -n 1` may close the pipe early, and under pipefail
        # scontrol's SIGPIPE (exit 141) would then fail the job on a long node list.
        'coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        f'export JAX_COORDINATOR_ADDRESS="$coordinator:{port}"',
        'export JAX_NUM_PROCESSES="$SLURM_NNODES"',
        # Single quotes: SLURM_PROCID is each task's own, read inside the task.
        "srun --kill-on-bad-exit=1 bash -c "
        + shlex.quote(f'JAX_PROCESS_ID="$SLURM_PROCID" exec {shlex.join(train_argv(flags))}'),
    ]
    return "\n".join(head + [""] + body) + "\n"


def ssh_commands(
    flags: Sequence[str], hosts: Sequence[str], workdir: str, port: int = DEFAULT_PORT
) -> list[list[str]]:
    """One `ssh host '<env> python3 -m distill_sbs.train ...'` per host; hosts[0] coordinates."""
    cmds = []
    for pid, host in enumerate(hosts):
        env = (
            f"JAX_COORDINATOR_ADDRESS={hosts[0]}:{port} "
            f"JAX_NUM_PROCESSES={len(hosts)} JAX_PROCESS_ID={pid}"
        )
        line = f"cd {shlex.quote(workdir)} && {env} {shlex.join(train_argv(flags))}"
        cmds.append(["ssh", host, line])
    return cmds


def run_ssh(cmds: Sequence[list[str]]) -> int:
    """Starts every host's command; when one fails, stops the others (they would wait for ever)."""
    from distill_sbs.launch import local

    return local.run_commands(cmds)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill_sbs.launch.gpu", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="subcommand", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--port", type=int, default=DEFAULT_PORT, help="coordinator port")
    common.add_argument("--dry_run", action="store_true", help="print, do not run")
    common.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the train flags")
    slurm = sub.add_parser("slurm", parents=[common])
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus_per_node", type=int, default=8)
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--job_name", default="distill_sbs")
    slurm.add_argument("--output", default="%x-%j.out", help="the log file (SLURM patterns)")
    slurm.add_argument("--requeue", action="store_true", help="restart after pre-emption")
    slurm.add_argument("--setup", default=None, help="a shell line run first (module load ...)")
    slurm.add_argument("--script", default="distill_sbs.sbatch", help="where to write the script")
    ssh = sub.add_parser("ssh", parents=[common])
    ssh.add_argument("--hosts", required=True, help="comma-separated; the first coordinates")
    ssh.add_argument("--workdir", default=".", help="directory to run in on each host")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    if not flags:
        raise SystemExit("error: give the train flags after --, e.g. -- --gin_file=...")
    if args.subcommand == "ssh":
        cmds = ssh_commands(flags, [h for h in args.hosts.split(",") if h], args.workdir, args.port)
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in cmds))
            return 0
        return run_ssh(cmds)
    script = slurm_script(
        flags,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        time=args.time,
        job_name=args.job_name,
        partition=args.partition,
        port=args.port,
        output=args.output,
        requeue=args.requeue,
        setup=args.setup,
    )
    submit = ["sbatch", args.script]
    if args.dry_run:
        print(script + "\n" + shlex.join(submit))
        return 0
    with storage.Path(args.script).open("w") as f:
        f.write(script)
    return subprocess.run(submit, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
