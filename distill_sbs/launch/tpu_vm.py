"""Cloud TPU VM launcher: create, set up, run, watch, keep running through pre-emptions, delete.

    python -m distill_sbs.launch.tpu_vm create --name my-tpu --zone us-central2-b \\
        --accelerator_type v4-32 --spot
    python -m distill_sbs.launch.tpu_vm setup --name my-tpu --zone us-central2-b \\
        --git_ref main        # or --wheel dist/distill_sbs-0.1.0-py3-none-any.whl
    python -m distill_sbs.launch.tpu_vm run --name my-tpu --zone us-central2-b -- \\
        --gin_file=paper/base.gin --gin_file=paper/cqa.gin --gin_file=models/t5_1_1_xxl.gin \\
        --gin.METHOD="'dss'" --gin.MODEL_DIR="'gs://bucket/cqa_dss_xxl'" ...
    python -m distill_sbs.launch.tpu_vm watch --name my-tpu --zone us-central2-b
    python -m distill_sbs.launch.tpu_vm keep_running ... -- <train flags>   # recreate + resume
    python -m distill_sbs.launch.tpu_vm delete --name my-tpu --zone us-central2-b

Every subcommand takes `--dry_run`, which prints each gcloud command instead of running it.
`run` starts `python3 -m distill_sbs.train <flags>` (or `--module`) on every worker
(jax.distributed finds the slice by itself), streams the output here and into `--log_file`, and
each worker also appends it to ~/distill_sbs.log, which `watch` tails. `--queued` uses queued
resources (the way to wait for capacity); `--spot` asks for spot capacity. `keep_running` loops:
run; when the run fails and the VM was pre-empted (or is gone), delete it, create it again, set
it up and run the same command, which resumes from the last checkpoint in MODEL_DIR (shared
storage, gs://).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from distill_sbs import storage

WORKER_LOG = "~/distill_sbs.log"
# States of a TPU VM after which it never runs again: it must be deleted and created anew.
DEAD_STATES = ("PREEMPTED", "TERMINATED", "NOT_FOUND")

Runner = Callable[[list[str], bool], subprocess.CompletedProcess]


def run_command(cmd: list[str], capture: bool) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=capture, text=True, check=False)


def dry_runner(out=None) -> Runner:
    """Prints each command; pretends it succeeded (a VM's state reads READY)."""

    def run(cmd: list[str], capture: bool) -> subprocess.CompletedProcess:
        print(shlex.join(cmd), file=out or sys.stdout)
        return subprocess.CompletedProcess(cmd, 0, "READY\n" if capture else None, "")

    return run


@dataclasses.dataclass
class TpuVm:
    name: str
    zone: str
    project: str | None = None
    queued: bool = False

    def _gcloud(self, *args: str) -> list[str]:
        cmd = ["gcloud", "compute", "tpus", *args, "--zone", self.zone]
        return cmd + (["--project", self.project] if self.project else [])

    def create(self, accelerator_type: str, version: str, spot: bool) -> list[list[str]]:
        if self.queued:
            cmd = self._gcloud("queued-resources", "create", self.name, "--node-id", self.name)
            cmd += ["--accelerator-type", accelerator_type, "--runtime-version", version]
        else:
            cmd = self._gcloud("tpu-vm", "create", self.name)
            cmd += ["--accelerator-type", accelerator_type, "--version", version]
        return [cmd + (["--spot"] if spot else [])]

    def describe(self) -> list[str]:
        return self._gcloud("tpu-vm", "describe", self.name) + ["--format", "value(state)"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return self._gcloud("tpu-vm", "ssh", self.name) + [
            f"--worker={worker}",
            "--command",
            command,
        ]

    def scp(self, local: str, remote: str) -> list[str]:
        return self._gcloud("tpu-vm", "scp", local, f"{self.name}:{remote}") + ["--worker=all"]

    def delete(self) -> list[list[str]]:
        if self.queued:
            return [self._gcloud("queued-resources", "delete", self.name) + ["--force", "--quiet"]]
        return [self._gcloud("tpu-vm", "delete", self.name) + ["--quiet"]]


def setup_commands(
    vm: TpuVm, git_ref: str | None, wheel: str | None, repo: str | None
) -> list[list[str]]:
    """Installs the package with its `tpu` extra (jax[tpu]) on every worker."""
    pip = "python3 -m pip install --upgrade"
    if wheel:
        remote = f"/tmp/{wheel.rsplit('/', 1)[-1]}"
        return [vm.scp(wheel, remote), vm.ssh(f"{pip} {shlex.quote(remote + '[tpu]')}")]
    if not repo:
        raise SystemExit("error: setup needs --wheel, or --repo (a git URL) with --git_ref")
    spec = f"distill_sbs[tpu] @ git+{repo}@{git_ref or 'main'}"
    return [vm.ssh(f"{pip} {shlex.quote(spec)}")]


def train_command(flags: Sequence[str], module: str = "distill_sbs.train") -> str:
    """The shell line each worker runs: the trainer, its output appended to the worker's log."""
    args = shlex.join(["python3", "-m", module, *flags])
    return f"set -o pipefail; {args} 2>&1 | tee -a {WORKER_LOG}"


def watch_command(vm: TpuVm, worker: str, lines: int) -> list[str]:
    return vm.ssh(f"tail -n {lines} -F {WORKER_LOG}", worker=worker)


def run_logged(runner: Runner, cmd: list[str], log_file: str | None, dry_run: bool) -> int:
    """Runs `cmd`, streaming its output to stdout and appending it to `log_file`."""
    if dry_run or not log_file:
        return runner(cmd, False).returncode
    with storage.Path(log_file).open("a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            log.flush()
        return proc.wait()


def state(vm: TpuVm, runner: Runner) -> str:
    """The VM's state (READY, PREEMPTED, ...), NOT_FOUND when describe fails."""
    result = runner(vm.describe(), True)
    if result.returncode != 0:
        return "NOT_FOUND"
    return (result.stdout or "").strip() or "NOT_FOUND"


def wait_until_active(vm: TpuVm, runner: Runner, dry_run: bool, poll_s: float = 30.0) -> int:
    """Queued resources: waits until the request is ACTIVE (the VM exists); 1 if it failed."""
    cmd = vm._gcloud("queued-resources", "describe", vm.name) + ["--format", "value(state.state)"]
    while True:
        result = runner(cmd, True)
        now = (result.stdout or "").strip()
        if dry_run or now == "ACTIVE":
            return 0
        if result.returncode != 0 or now in ("FAILED", "SUSPENDED"):
            print(f"error: queued resource {vm.name} is {now or 'unreadable'}: {result.stderr}")
            return 1
        time.sleep(poll_s)


def keep_running(
    vm: TpuVm,
    runner: Runner,
    run_once: Callable[[], int],
    recreate: Callable[[], None],
    max_restarts: int,
    wait_s: float = 60.0,
) -> int:
    """Runs until the job succeeds; after a pre-emption recreates the VM and runs again.

    A failure on a VM still READY is the job's own (a bug, a bad flag): returned, not retried.
    """
    restarts = 0
    while True:
        status = run_once()
        if status == 0:
            return 0
        now = state(vm, runner)
        if now not in DEAD_STATES:
            print(f"error: the run failed with status {status} on a {now} VM: not a pre-emption")
            return status
        if restarts == max_restarts:
            print(f"error: pre-empted {restarts + 1} times; giving up (--max_restarts)")
            return status
        restarts += 1
        print(f"{vm.name} is {now}: recreating it (restart {restarts} of {max_restarts})")
        recreate()
        time.sleep(wait_s)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distill_sbs.launch.tpu_vm", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="subcommand", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", default=None)
    common.add_argument("--queued", action="store_true", help="use queued resources")
    common.add_argument("--dry_run", action="store_true", help="print the gcloud commands only")
    create = argparse.ArgumentParser(add_help=False)
    create.add_argument("--accelerator_type", default="v4-8")
    create.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU runtime version")
    create.add_argument("--spot", action="store_true")
    setup = argparse.ArgumentParser(add_help=False)
    setup.add_argument("--git_ref", default=None, help="branch, tag or commit (default main)")
    setup.add_argument("--repo", default=None, help="git URL of the repository to install")
    setup.add_argument("--wheel", default=None, help="a built wheel to copy and install instead")
    run = argparse.ArgumentParser(add_help=False)
    run.add_argument("--log_file", default=None, help="also append the output to this file here")
    run.add_argument("--module", default="distill_sbs.train", help="e.g. distill_sbs.sweep")
    run.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the train flags")
    sub.add_parser("create", parents=[common, create])
    sub.add_parser("setup", parents=[common, setup])
    sub.add_parser("run", parents=[common, run])
    watch = sub.add_parser("watch", parents=[common])
    watch.add_argument("--worker", default="0")
    watch.add_argument("--lines", type=int, default=100)
    loop = sub.add_parser("keep_running", parents=[common, create, setup, run])
    loop.add_argument("--max_restarts", type=int, default=20)
    loop.add_argument("--wait_s", type=float, default=60.0, help="pause after a recreation")
    sub.add_parser("delete", parents=[common])
    return parser


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    args = _parser().parse_args(argv)
    runner = runner or (dry_runner() if args.dry_run else run_command)
    vm = TpuVm(args.name, args.zone, args.project, args.queued)

    def run_all(cmds: list[list[str]]) -> int:
        for cmd in cmds:
            if status := runner(cmd, False).returncode:
                return status
        return 0

    def create() -> int:
        status = run_all(vm.create(args.accelerator_type, args.version, args.spot))
        if status == 0 and vm.queued:
            status = wait_until_active(vm, runner, args.dry_run)
        return status

    if args.subcommand == "create":
        return create()
    if args.subcommand == "setup":
        return run_all(setup_commands(vm, args.git_ref, args.wheel, args.repo))
    if args.subcommand == "watch":
        return run_all([watch_command(vm, args.worker, args.lines)])
    if args.subcommand == "delete":
        return run_all(vm.delete())
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    if not flags:
        raise SystemExit("error: give the train flags after --, e.g. -- --gin_file=...")
    ssh = vm.ssh(train_command(flags, args.module))
    if args.subcommand == "run":
        return run_logged(runner, ssh, args.log_file, args.dry_run)

    def recreate() -> None:
        run_all(vm.delete())
        if create() == 0:
            run_all(setup_commands(vm, args.git_ref, args.wheel, args.repo))

    return keep_running(
        vm,
        runner,
        lambda: run_logged(runner, ssh, args.log_file, args.dry_run),
        recreate,
        args.max_restarts,
        0.0 if args.dry_run else args.wait_s,
    )


if __name__ == "__main__":
    sys.exit(main())
