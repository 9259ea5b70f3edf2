"""Launchers: N local processes (`local`), Cloud TPU VMs (`tpu_vm`), GPU hosts (`gpu`: SLURM
or plain ssh). Each builds the same `python -m distill_sbs.train ...` command for every process
and describes the cluster to jax.distributed with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or lets jax detect a TPU slice); `--dry_run` prints what would run."""
