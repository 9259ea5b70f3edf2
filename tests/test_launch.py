"""Launchers: the Cloud TPU VM launcher's dry runs per subcommand and its pre-emption loop (with a
scripted gcloud), the SLURM script and ssh commands executed with stand-ins for scontrol, srun,
ssh and python3 (so the quoting and the cluster variables are what a real job would get), and the
local launcher running a real 2-process jax job."""

from __future__ import annotations

import io
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from distill_sbs.launch import gpu, local, tpu_vm

FLAGS = ["--gin_file=paper/base.gin", "--gin.MODEL_DIR='gs://b/run one'", "--gin.METHOD=\"'dss'\""]
Z = "--zone us-central2-b"


def _dry(argv: list[str]) -> list[str]:
    out = io.StringIO()
    argv = [argv[0], "--dry_run", *argv[1:]]  # before `--`: what follows are train flags
    assert tpu_vm.main(argv, runner=tpu_vm.dry_runner(out)) == 0
    return out.getvalue().splitlines()


TRAIN_LINE = (
    "set -o pipefail; python3 -m distill_sbs.train --gin_file=paper/base.gin "
    "'--gin.MODEL_DIR='\"'\"'gs://b/run one'\"'\"'' "
    "'--gin.METHOD=\"'\"'\"'dss'\"'\"'\"' 2>&1 | tee -a ~/distill_sbs.log"
)
EXPECTED = {
    "create": (
        ["create", "--name", "t", "--zone", "us-central2-b", "--accelerator_type", "v4-32"],
        [
            "gcloud compute tpus tpu-vm create t --zone us-central2-b --accelerator-type v4-32 "
            "--version tpu-ubuntu2204-base"
        ],
    ),
    "create spot queued": (
        ["create", "--name", "t", "--zone", "us-central2-b", "--queued", "--spot"],
        [
            "gcloud compute tpus queued-resources create t --node-id t --zone us-central2-b "
            "--accelerator-type v4-8 --runtime-version tpu-ubuntu2204-base --spot",
            f"gcloud compute tpus queued-resources describe t {Z} --format 'value(state.state)'",
        ],
    ),
    "setup git": (
        ["setup", "--name", "t", "--zone", "us-central2-b", "--repo", "https://g/x.git"],
        [
            f"gcloud compute tpus tpu-vm ssh t {Z} --worker=all --command 'python3 -m pip "
            "install --upgrade '\"'\"'distill_sbs[tpu] @ git+https://g/x.git@main'\"'\"''"
        ],
    ),
    "setup wheel": (
        [
            "setup",
            "--name",
            "t",
            "--zone",
            "us-central2-b",
            "--wheel",
            "dist/d-0.1-py3-none-any.whl",
        ],
        [
            "gcloud compute tpus tpu-vm scp dist/d-0.1-py3-none-any.whl "
            f"t:/tmp/d-0.1-py3-none-any.whl {Z} --worker=all",
            f"gcloud compute tpus tpu-vm ssh t {Z} --worker=all --command 'python3 -m pip "
            "install --upgrade '\"'\"'/tmp/d-0.1-py3-none-any.whl[tpu]'\"'\"''",
        ],
    ),
    "run": (
        ["run", "--name", "t", "--zone", "us-central2-b", "--project", "p", "--", *FLAGS],
        [
            "gcloud compute tpus tpu-vm ssh t --zone us-central2-b --project p --worker=all "
            f"--command {shlex.quote(TRAIN_LINE)}"
        ],
    ),
    "watch": (
        ["watch", "--name", "t", "--zone", "us-central2-b", "--worker", "3"],
        [
            f"gcloud compute tpus tpu-vm ssh t {Z} --worker=3 --command "
            "'tail -n 100 -F ~/distill_sbs.log'"
        ],
    ),
    "delete": (
        ["delete", "--name", "t", "--zone", "us-central2-b"],
        [f"gcloud compute tpus tpu-vm delete t {Z} --quiet"],
    ),
    "delete queued": (
        ["delete", "--name", "t", "--zone", "us-central2-b", "--queued"],
        [f"gcloud compute tpus queued-resources delete t {Z} --force --quiet"],
    ),
    "keep_running": (  # a dry run: the first run "succeeds", so one run and nothing else
        ["keep_running", "--name", "t", "--zone", "us-central2-b", "--wheel", "w.whl", "--", "-x"],
        [
            f"gcloud compute tpus tpu-vm ssh t {Z} --worker=all --command 'set -o pipefail; "
            "python3 -m distill_sbs.train -x 2>&1 | tee -a ~/distill_sbs.log'"
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_tpu_vm_dry_runs(case):
    argv, want = EXPECTED[case]
    assert _dry(argv) == want


def test_tpu_vm_run_passes_flags_through_both_shells_unchanged():
    (line,) = _dry(["run", "--name", "t", "--zone", "z", "--", *FLAGS])
    remote = shlex.split(line)[-1]  # what gcloud hands the worker's shell
    argv = shlex.split(remote.split("; ", 1)[1].split(" 2>&1")[0])
    assert argv == ["python3", "-m", "distill_sbs.train", *FLAGS]


class ScriptedGcloud:
    """Answers each command from a script: run attempts' statuses and describe's states."""

    def __init__(self, run_statuses: list[int], states: list[str]) -> None:
        self.run_statuses, self.states, self.calls = run_statuses, states, []

    def __call__(self, cmd: list[str], capture: bool) -> subprocess.CompletedProcess:
        verb = cmd[3:5]
        self.calls.append(" ".join(verb))
        status, out = 0, ""
        if verb == ["tpu-vm", "ssh"] and "distill_sbs.train" in cmd[-1]:
            status = self.run_statuses.pop(0)
        elif verb == ["tpu-vm", "describe"]:
            out = self.states.pop(0)
            status = 1 if out == "NOT_FOUND" else 0
        return subprocess.CompletedProcess(cmd, status, out, "")


LOOP = ["keep_running", "--name", "t", "--zone", "z", "--repo", "https://g/x.git", "--wait_s", "0"]


def test_keep_running_recreates_after_preemption_and_runs_the_same_command_again():
    gcloud = ScriptedGcloud(run_statuses=[255, 255, 0], states=["PREEMPTED", "NOT_FOUND"])
    assert tpu_vm.main([*LOOP, "--spot", "--", "-x"], runner=gcloud) == 0
    recreate = ["tpu-vm delete", "tpu-vm create", "tpu-vm ssh"]  # delete, create, setup
    assert gcloud.calls == [
        "tpu-vm ssh",
        "tpu-vm describe",
        *recreate,
        "tpu-vm ssh",
        "tpu-vm describe",
        *recreate,
        "tpu-vm ssh",
    ]


def test_keep_running_does_not_retry_a_failure_on_a_healthy_vm(capsys):
    gcloud = ScriptedGcloud(run_statuses=[2], states=["READY"])
    assert tpu_vm.main([*LOOP, "--", "-x"], runner=gcloud) == 2
    assert gcloud.calls == ["tpu-vm ssh", "tpu-vm describe"]
    assert "not a pre-emption" in capsys.readouterr().out


def test_keep_running_gives_up_after_max_restarts():
    gcloud = ScriptedGcloud(run_statuses=[1, 1], states=["PREEMPTED", "PREEMPTED"])
    assert tpu_vm.main([*LOOP, "--max_restarts", "1", "--", "-x"], runner=gcloud) == 1
    assert gcloud.calls.count("tpu-vm create") == 1


def test_tpu_vm_sh_is_the_run_subcommand(tmp_path, subprocess_env, repo_dir):
    """launch/tpu_vm.sh NAME ZONE flags (a sweep's --launcher) runs MODULE through `run`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    (bin_dir / "gcloud").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')  # one arg a line
    (bin_dir / "gcloud").chmod(0o755)
    env = dict(subprocess_env, MODULE="distill_sbs.sweep")
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    script = str(repo_dir / "launch" / "tpu_vm.sh")
    ran = subprocess.run(
        ["bash", script, "t", "z", "--gin_file=a.gin"], env=env, text=True, capture_output=True
    )
    assert ran.returncode == 0, ran.stderr
    remote = ran.stdout.splitlines()[-1]
    assert remote == (
        "set -o pipefail; python3 -m distill_sbs.sweep --gin_file=a.gin 2>&1 | tee -a "
        "~/distill_sbs.log"
    )


def test_tpu_vm_setup_needs_a_source():
    with pytest.raises(SystemExit, match="--wheel, or --repo"):
        tpu_vm.main(["setup", "--name", "t", "--zone", "z", "--dry_run"])


# ---- GPU: SLURM and ssh, run with stand-ins for the cluster's commands -----------------------


def _stand_ins(tmp_path) -> dict[str, str]:
    """scontrol (two nodes), srun (two tasks, SLURM_PROCID 0 and 1), ssh (runs the line here),
    python3 (prints its JAX_* variables and argv as one JSON line)."""
    scripts = {
        "scontrol": 'printf "gpu-node-a\\ngpu-node-b\\n"',
        "srun": 'shift; for i in 0 1; do SLURM_PROCID=$i "$@"; done',
        "ssh": 'bash -c "$2"',
        "python3": f"exec {shlex.quote(sys.executable)} -c "
        + shlex.quote(
            "import json, os, sys; print(json.dumps([{k: v for k, v in os.environ.items() "
            "if k.startswith('JAX_')}, sys.argv[1:]]))"
        )
        + ' "$@"',
    }
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _launched(output: str) -> list:
    import json

    return [json.loads(line) for line in output.splitlines() if line.startswith("[")]


def test_slurm_script_gives_each_task_its_cluster_variables(tmp_path, capsys):
    argv = ["slurm", "--nodes", "2", "--gpus_per_node", "4", "--partition", "a100", "--requeue"]
    assert gpu.main([*argv, "--dry_run", "--", *FLAGS]) == 0
    printed = capsys.readouterr().out
    script, submit = printed.rsplit("\n\n", 1)
    assert submit.strip() == "sbatch distill_sbs.sbatch"
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=a100"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --requeue" in script
    env = dict(_stand_ins(tmp_path), SLURM_JOB_NODELIST="gpu-node-[a-b]", SLURM_NNODES="2")
    ran = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    tasks = _launched(ran.stdout)
    assert [t[0] for t in tasks] == [
        {"JAX_COORDINATOR_ADDRESS": "gpu-node-a:12355", "JAX_NUM_PROCESSES": "2", **pid}
        for pid in ({"JAX_PROCESS_ID": "0"}, {"JAX_PROCESS_ID": "1"})
    ]
    assert all(t[1] == ["-m", "distill_sbs.train", *FLAGS] for t in tasks)


def test_ssh_launch_gives_each_host_its_process_id(tmp_path, capsys):
    assert (
        gpu.main(
            ["ssh", "--hosts", "h1,h2,h3", "--workdir", str(tmp_path), "--dry_run", "--", *FLAGS]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line)[1] for line in lines] == ["h1", "h2", "h3"]
    env = _stand_ins(tmp_path)
    outs = [
        subprocess.run(shlex.split(line), env=env, capture_output=True, text=True).stdout
        for line in lines
    ]
    got = [_launched(o)[0] for o in outs]
    assert [g[0]["JAX_PROCESS_ID"] for g in got] == ["0", "1", "2"]
    assert {g[0]["JAX_COORDINATOR_ADDRESS"] for g in got} == {"h1:12355"}
    assert all(g[1] == ["-m", "distill_sbs.train", *FLAGS] for g in got)


def test_gpu_launch_needs_train_flags():
    with pytest.raises(SystemExit, match="train flags"):
        gpu.main(["slurm", "--nodes", "2", "--dry_run"])


# ---- local: a real 2-process jax job ----------------------------------------------------------

PSUM = textwrap.dedent(
    """
    from distill_sbs.partitioning import maybe_initialize_distributed
    assert maybe_initialize_distributed()
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print("RESULT", jax.process_index(), jax.device_count(), float(total))
    """
)


def test_local_launcher_runs_a_two_process_job(subprocess_env, capfd):
    envs = local.process_envs(2, subprocess_env, local.free_port(), cpu_devices=2)
    assert local.run_commands([[sys.executable, "-c", PSUM]] * 2, envs) == 0
    out = capfd.readouterr().out
    # 2 processes x 2 devices; process 0's devices hold 1.0, process 1's hold 2.0: sum 6.
    for pid in (0, 1):
        assert f"[process {pid}] RESULT {pid} 4 6.0" in out, out[-3000:]


def test_local_launcher_stops_the_others_when_one_fails(subprocess_env):
    code = (
        "import os, sys, time; pid = os.environ['JAX_PROCESS_ID']; "
        "sys.exit(3) if pid == '1' else time.sleep(120)"
    )
    envs = local.process_envs(2, subprocess_env, 1234)
    start = time.time()
    assert local.run_commands([[sys.executable, "-c", code]] * 2, envs) == 3
    assert time.time() - start < 60
