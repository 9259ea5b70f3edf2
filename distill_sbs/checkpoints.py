"""Checkpoints with orbax.

A *native checkpoint directory* is self-describing:

    DIR/config.json     {"model": T5Config.to_dict(),
                         "vocabulary": {"file": "spiece.model", "extra_ids": 100}}
    DIR/spiece.model    the SentencePiece model of the vocabulary (absent if the config names none)
    DIR/params/         an orbax StandardCheckpointer tree of float32 parameters

A training MODEL_DIR holds the same config.json and spiece.model at its top, and one step directory
per saved step, `MODEL_DIR/checkpoint_<step>/params` (plus optimizer and data state); loading a
MODEL_DIR, or one of its step directories, gives that step's (or the latest step's) parameters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from distill_sbs import storage
from distill_sbs.errors import UserError
from distill_sbs.network import T5Config

CONFIG_FILE = "config.json"
VOCAB_FILE = "spiece.model"
PARAMS_DIR = "params"
STEP_PREFIX = "checkpoint"
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")


@dataclasses.dataclass(frozen=True)
class NativeCheckpoint:
    config: T5Config
    params: Any  # nested dict of arrays
    vocab_file: str | None  # path of the SentencePiece model, or None
    extra_ids: int
    step: int | None  # the training step, for a MODEL_DIR step directory


def write_model_description(
    directory: str, config: T5Config, vocab_file: str | None, extra_ids: int = 100
) -> None:
    """Writes config.json and copies the vocabulary into `directory` (local or e.g. gs://)."""
    storage.makedirs(directory)
    vocab = None
    if vocab_file is not None:
        dest = storage.join(directory, VOCAB_FILE)
        if storage.resolve(vocab_file) != storage.resolve(dest):
            storage.write_bytes(dest, storage.read_bytes(vocab_file))
        vocab = {"file": VOCAB_FILE, "extra_ids": extra_ids}
    # config.json is written last and whole: a directory with it has its vocabulary too.
    storage.write_json(
        storage.join(directory, CONFIG_FILE), {"model": config.to_dict(), "vocabulary": vocab}
    )


def read_model_description(directory: str) -> tuple[T5Config, str | None, int]:
    """Reads config.json of a native checkpoint or MODEL_DIR: (config, vocab path, extra ids)."""
    path = storage.join(directory, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: not found; is {directory} a native checkpoint directory?")
    try:
        desc = storage.read_json(path)  # a garbled file: invalid JSON or not UTF-8
    except ValueError as e:
        raise UserError(f"{path}: not a checkpoint description ({e})") from e
    if not isinstance(desc, dict) or "model" not in desc:
        raise UserError(f"{path}: missing field 'model'")
    try:
        config = T5Config.from_dict(desc["model"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: field 'model': {e}") from e
    vocab = desc.get("vocabulary")
    if not vocab:
        return config, None, 0
    return config, storage.join(directory, vocab["file"]), int(vocab.get("extra_ids", 100))


def save_native(
    directory: str,
    params: Any,
    config: T5Config,
    vocab_file: str | None,
    extra_ids: int = 100,
) -> None:
    """Saves a self-describing native checkpoint (config, vocabulary, parameters)."""
    write_model_description(directory, config, vocab_file, extra_ids)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.join(storage.resolve(directory), PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()


# checkpoint_<step>, or the same name with orbax's ".orbax-checkpoint-tmp-<time>" of a save that
# never finished
_STEP_NAME = re.compile(rf"^{STEP_PREFIX}_(\d+)(\..+)?$")


def is_step_dir(path: storage.PathLike) -> bool:
    """Whether `path` is a MODEL_DIR's step directory (described by its parent's config.json)."""
    p = storage.Path(path)
    return bool(_STEP_NAME.match(p.name)) and not (p / CONFIG_FILE).exists()


def step_dirs(model_dir: str) -> dict[int, str]:
    """The committed step directories of a MODEL_DIR, by step.

    Committed is orbax's own test (`ocp.step.is_path_finalized`: locally the step directory was
    renamed from its temporary name, on GCS it holds orbax's commit_success.txt). A step directory
    newer than the newest committed one is skipped with a warning that names it.
    """
    committed: dict[int, str] = {}
    skipped: dict[int, str] = {}
    for name in storage.listdir(model_dir):
        m = _STEP_NAME.match(name)
        if not m:
            continue
        path = storage.Path(model_dir) / name
        step = int(m.group(1))
        if m.group(2) is None and ocp.step.is_path_finalized(path) and (path / PARAMS_DIR).is_dir():
            committed[step] = str(path)
        else:
            skipped[step] = str(path)
    newest = max(committed, default=-1)
    for step in sorted(s for s in skipped if s > newest):
        fallback = f"using {committed[newest]}" if committed else "no committed step to use"
        logging.warning(
            "%s: incomplete checkpoint (orbax never committed it; an interrupted save or a "
            "partial copy); skipped, %s",
            skipped[step],
            fallback,
        )
    return committed


def load_native(directory: str, abstract_params: Any = None) -> NativeCheckpoint:
    """Loads a native checkpoint, a MODEL_DIR (latest committed step) or a MODEL_DIR step dir.

    `abstract_params`, a tree of jax.ShapeDtypeStruct with shardings, restores each array straight
    into its sharding (each host reads only the shards its devices hold); None restores on host.
    """
    directory = storage.resolve(directory)
    root = storage.Path(directory)
    step = None
    if is_step_dir(root):
        m = _STEP_NAME.match(root.name)
        if not ocp.step.is_path_finalized(root) or m.group(2) is not None:
            raise UserError(
                f"{directory}: incomplete checkpoint (orbax never committed it; an interrupted "
                f"save or a partial copy); load {root.parent} to use its newest committed step"
            )
        described, params_dir, step = str(root.parent), directory, int(m.group(1))
    elif (root / PARAMS_DIR).is_dir():
        described, params_dir = directory, directory
    else:
        steps = step_dirs(directory)
        if not steps:
            what = "no such directory" if not root.exists() else "no checkpoint inside"
            raise FileNotFoundError(
                f"{directory}: {what} (expected '{PARAMS_DIR}/' or committed "
                f"'{STEP_PREFIX}_<step>/' directories)"
            )
        step = max(steps)
        described, params_dir = directory, steps[step]
    config, vocab_file, extra_ids = read_model_description(described)
    params_path = storage.join(params_dir, PARAMS_DIR)
    if not ocp.step.is_path_finalized(params_path):  # e.g. no commit_success.txt on GCS
        raise UserError(
            f"{params_path}: incomplete parameters (orbax never committed them; an interrupted "
            "save or a partial copy)"
        )
    try:
        params = ocp.StandardCheckpointer().restore(params_path, abstract_params)
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise bare Exception for bad files
        cause = " ".join(str(e.__cause__ or e).split())
        raise UserError(
            f"{params_path}: cannot be restored; a corrupt or partial copy, or parameters of "
            f"another model? ({cause[:300]})"
        ) from e
    return NativeCheckpoint(config, params, vocab_file, extra_ids, step)


# --------------------------------------------------------------------------------------------------
# Training checkpoints: MODEL_DIR/checkpoint_<step>/{params,opt_state,data_state}

OPT_STATE_DIR = "opt_state"
DATA_STATE_DIR = "data_state"
BEST_DIR = "best"


class CheckpointManager:
    """Periodic/final, keep-N, asynchronous training checkpoints in a MODEL_DIR, and resume.

    Each step directory holds the parameters (so `distill_sbs.load(MODEL_DIR)` works), the
    optimizer state and the data position (a small JSON dict, e.g. {"batches_consumed": n}).
    The best checkpoint by an eval metric is kept apart in MODEL_DIR/best/checkpoint_<step>/params,
    where retention of the periodic checkpoints cannot delete it.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        config: T5Config | None = None,
        vocab_file: str | None = None,
        extra_ids: int = 100,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: str = "max",
    ) -> None:
        self.model_dir = storage.resolve(model_dir)
        self.save_interval_steps = save_interval_steps
        if config is not None and jax_process_index() == 0:
            write_model_description(self.model_dir, config, vocab_file, extra_ids)
        self._manager = ocp.CheckpointManager(
            self.model_dir,
            options=ocp.CheckpointManagerOptions(
                step_prefix=STEP_PREFIX,
                max_to_keep=max_to_keep,
                # We decide when to save (periodic + final); orbax only enforces retention.
                save_interval_steps=1,
                enable_async_checkpointing=async_save,
            ),
        )
        self.best_metric = best_metric
        self._best = None
        if best_metric is not None:
            best_dir = storage.join(self.model_dir, BEST_DIR)
            if config is not None and jax_process_index() == 0:
                write_model_description(best_dir, config, vocab_file, extra_ids)
            self._best = ocp.CheckpointManager(
                best_dir,
                options=ocp.CheckpointManagerOptions(
                    step_prefix=STEP_PREFIX,
                    max_to_keep=1,
                    best_fn=lambda m: float(m[best_metric]),
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                    enable_async_checkpointing=async_save,
                ),
            )

    def latest_step(self) -> int | None:
        """The newest committed step (orbax's test); newer uncommitted ones are named in a
        warning by step_dirs."""
        step_dirs(self.model_dir)  # warns about the skipped ones
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.save_interval_steps > 0 and step % self.save_interval_steps == 0

    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        data_state: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Saves a step (asynchronously if enabled) if periodic or forced; returns whether saved."""
        if not force and not self.should_save(step):
            return False
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    PARAMS_DIR: ocp.args.StandardSave(params),
                    OPT_STATE_DIR: ocp.args.StandardSave(opt_state),
                    DATA_STATE_DIR: ocp.args.JsonSave(data_state),
                }
            ),
            force=True,
        )

    def restore(
        self, step: int, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Restores (params, opt_state, data_state) of `step`, sharded as the abstract trees say."""
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        PARAMS_DIR: ocp.args.StandardRestore(abstract_params),
                        OPT_STATE_DIR: ocp.args.StandardRestore(abstract_opt_state),
                        DATA_STATE_DIR: ocp.args.JsonRestore(),
                    }
                ),
            )
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{self.model_dir}/{STEP_PREFIX}_{step}: does not match the model/optimizer being "
                f"trained (different config or optimizer?): {e}"
            ) from e
        return out[PARAMS_DIR], out[OPT_STATE_DIR], dict(out[DATA_STATE_DIR])

    def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
        """Offers `params` at `step` as the best checkpoint; kept if its metric is the best."""
        if self._best is None or self.best_metric not in metrics:
            return
        if step in self._best.all_steps():
            return
        self._best.save(
            step,
            args=ocp.args.Composite(**{PARAMS_DIR: ocp.args.StandardSave(params)}),
            metrics={self.best_metric: float(metrics[self.best_metric])},
        )

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
        if self._best is not None:
            self._best.close()


def jax_process_index() -> int:
    import jax

    return jax.process_index()
