"""Checkpoints with orbax.

A *native checkpoint directory* is self-describing:

    DIR/config.json     {"model": T5Config.to_dict(),
                         "vocabulary": {"file": "spiece.model", "extra_ids": 100}}
    DIR/spiece.model    the SentencePiece model of the vocabulary (absent if the config names none)
    DIR/params/         an orbax StandardCheckpointer tree of float32 parameters

A training MODEL_DIR holds the same config.json and spiece.model at its top, and one step directory
per saved step, `MODEL_DIR/checkpoint_<step>/params` (plus optimizer and data state); loading a
MODEL_DIR, or one of its step directories, gives that step's (or the latest step's) parameters.

Storage faults, one policy for every program: each saved step (and native checkpoint) carries
checksums.json, the size and SHA-256 of each of its files, written before orbax commits the step.
A step is verified against it before anything is restored, so a truncated, garbled, missing or
unreadable file is one `CorruptCheckpoint` line naming the file and the cause, never a config
mismatch and never wrong numbers (orbax itself restores a garbled array chunk without noticing).
Loading a MODEL_DIR, and resuming training, take the newest intact step and warn about each newer
one they skip. A save that fails (full or read-only disk) is one `SaveFailed` line naming the path
and the OS error; interrupted saves are removed when a CheckpointManager starts, saying so.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging as py_logging
import re
import sys
import time
from collections.abc import Callable, Iterator
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


# --------------------------------------------------------------------------------------------------
# Storage faults: checksums of a step's files, the one-line reports, orbax's noise kept quiet

CHECKSUMS_FILE = "checksums.json"
# orbax's bookkeeping, rewritten when it commits a step (after the checksums are written); a
# restore does not read it
_NOT_CHECKSUMMED = {CHECKSUMS_FILE, "_CHECKPOINT_METADATA", "commit_success.txt"}
_TMP_MARK = ".orbax-checkpoint-tmp"


class CorruptCheckpoint(UserError):
    """A checkpoint file that cannot be read; the message names it and the cause (corrupt,
    truncated, missing, unreadable)."""


class SaveFailed(UserError):
    """A checkpoint that could not be written; the message names the path and the OS error."""


def _files(directory: storage.Path) -> Iterator[tuple[str, storage.Path]]:
    """(path relative to `directory`, path) of every file below it that the checksums cover."""
    for child in sorted(directory.iterdir()):
        if child.is_dir():
            for rel, path in _files(child):
                yield f"{child.name}/{rel}", path
        elif child.name not in _NOT_CHECKSUMMED:
            yield child.name, child


def _digest(path: storage.Path) -> tuple[int, str]:
    """(size, SHA-256) of a file, read in pieces."""
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
            size += len(piece)
    return size, h.hexdigest()


def write_checksums(directory: storage.PathLike) -> None:
    """Writes DIRECTORY/checksums.json: {"files": {relative path: [size, sha256]}}."""
    root = storage.Path(directory)
    files = {rel: list(_digest(path)) for rel, path in _files(root)}
    record = {"files": files, "sha256": _record_digest(files)}
    storage.write_json(storage.join(directory, CHECKSUMS_FILE), record)


def _record_digest(files: dict[str, Any]) -> str:
    """The record's own checksum: a garbled record is named as such, not as the file it lists."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_checksums(directory: storage.PathLike) -> bool:
    """Checks every file against DIRECTORY/checksums.json; False when there is none (a step saved
    before checksums existed, or killed between orbax's commit and a synchronous save's record).
    Raises CorruptCheckpoint naming the first file that is missing, truncated, corrupt or
    unreadable."""
    record = storage.Path(directory) / CHECKSUMS_FILE
    if not record.exists():
        return False
    try:
        value = storage.read_json(record)
        files = value["files"]
        if value["sha256"] != _record_digest(files):
            raise ValueError("its own checksum differs")
        expected = {str(k): (int(v[0]), str(v[1])) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CorruptCheckpoint(
            f"{record}: corrupt (not a checksum record: {_os_reason(e)})"
        ) from e
    except OSError as e:
        raise CorruptCheckpoint(f"{record}: unreadable ({_os_reason(e)})") from e
    for rel, (size, sha) in sorted(expected.items()):
        path = storage.Path(directory) / rel
        try:
            got_size, got_sha = _digest(path)
        except FileNotFoundError as e:
            raise CorruptCheckpoint(f"{path}: missing") from e
        except OSError as e:
            raise CorruptCheckpoint(f"{path}: unreadable ({_os_reason(e)})") from e
        if got_size < size:
            raise CorruptCheckpoint(f"{path}: truncated ({got_size} of {size} bytes)")
        if (got_size, got_sha) != (size, sha):
            raise CorruptCheckpoint(f"{path}: corrupt (its checksum differs from the saved one)")
    return True


def _os_reason(e: BaseException) -> str:
    """The OS error behind `e` (an OSError, or one in its chain or in tensorstore's message), else
    its message on one line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"[Errno {seen.errno}] {seen.strerror}"
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e).split())
    m = re.search(r"\[OS error(?: \d+)?: ([^\]]+)\]", text)
    if m:
        return m.group(1).strip()
    for known in ("No space left on device", "Read-only file system", "Permission denied"):
        if known in text:
            return known
    return text[:200]


# tensorstore's status codes of a file that is there but cannot be read as written, and what
# they mean for the file
_READ_FAULTS = (
    ("NOT_FOUND", "missing"),
    ("OUT_OF_RANGE", "truncated"),
    ("DATA_LOSS", "corrupt"),
    ("JSONDecodeError", "corrupt"),
)


def _read_fault(directory: str, e: BaseException) -> CorruptCheckpoint | None:
    """The CorruptCheckpoint a failed restore of an unverified step amounts to, or None when the
    failure is not about reading files (a different model or optimizer)."""
    chain, seen = [], e
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(" ".join(f"{type(x).__name__}: {x}".split()) for x in chain)
    for code, cause in _READ_FAULTS:
        if code in text:
            files = re.findall(r'(?:local )?file "([^"]+)"', text)
            where = files[-1] if files else directory
            if isinstance(chain[-1], FileNotFoundError) and chain[-1].filename:
                where = chain[-1].filename
            return CorruptCheckpoint(f"{where}: {cause} ({_os_reason(chain[-1])[:160]})")
    if any(isinstance(x, FileNotFoundError) for x in chain):
        missing = next(x for x in chain if isinstance(x, FileNotFoundError))
        return CorruptCheckpoint(f"{missing.filename or directory}: missing")
    if any(isinstance(x, OSError) for x in chain):
        return CorruptCheckpoint(f"{directory}: unreadable ({_os_reason(e)})")
    if "Encountered error while reading array" in text:
        return CorruptCheckpoint(f"{directory}: corrupt (an array cannot be read)")
    return None


class _OrbaxQuiet(py_logging.Filter):
    """orbax reports a failed background save only in its log (tracebacks from its threads):
    those records are kept here (the first error becomes our one line) instead of printed."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: py_logging.LogRecord) -> bool:
        if "orbax" not in record.pathname or record.levelno < py_logging.ERROR:
            return True
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
        return _debug()


class _OrbaxFutures(py_logging.Filter):
    """asyncio logs each of orbax's reads or writes that failed after the first failure was
    raised ("Task exception was never retrieved"), when they are collected, possibly at exit:
    one traceback per array. The first failure is already reported; these are dropped."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno < py_logging.ERROR or "never retrieved" not in str(record.msg):
            return True
        text = record.getMessage()
        return _debug() if "orbax" in text or "tensorstore" in text else True


py_logging.getLogger("asyncio").addFilter(_OrbaxFutures())


def _drop_closed_loop_callbacks(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """sys.unraisablehook that drops "Event loop is closed" from tensorstore's completion
    callbacks: after a failed save, orbax's event loop is gone when its remaining writes
    finish, and each would print a traceback. The failure itself is already our one line."""

    def unraisable(info: Any) -> None:
        closed_loop = (
            isinstance(info.exc_value, RuntimeError)
            and str(info.exc_value) == "Event loop is closed"
            and info.object is None
        )
        if not closed_loop or _debug():
            hook(info)

    return unraisable


sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _debug() -> bool:
    import os

    from distill_sbs.errors import DEBUG_ENV

    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class _quiet_orbax:  # noqa: N801 - used as a context manager, like contextlib's
    """Installs an _OrbaxQuiet on the absl logger while active."""

    def __init__(self) -> None:
        self.filter = _OrbaxQuiet()

    def __enter__(self) -> _OrbaxQuiet:
        py_logging.getLogger("absl").addFilter(self.filter)
        return self.filter

    def __exit__(self, *exc: object) -> None:
        gc.collect()  # the never-awaited futures of a failed read log when collected
        py_logging.getLogger("absl").removeFilter(self.filter)


def _restore_step(directory: str, restore: Callable[[], Any]) -> Any:
    """restore() of a step or native checkpoint whose checksums are in `directory`, integrity
    first: checksums when it has them, else a failed read is told apart from a different model
    by tensorstore's status. Raises CorruptCheckpoint, or UserError when the files are intact
    but do not fit."""
    verified = verify_checksums(directory)
    with _quiet_orbax():
        try:
            return restore()
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise bare Exception
            fault = None if verified else _read_fault(directory, e)
            if fault is not None:
                raise fault from e
            cause = " ".join(str(e.__cause__ or e).split())[:300]
            raise UserError(
                f"{directory}: does not match the model/optimizer being restored (different "
                f"config or optimizer?): {cause}"
            ) from e


def _move_tree(src: str, dst: str) -> None:
    """Moves a directory: a rename on a file system, a copy then delete on an object store."""
    if not storage.is_remote(src):
        storage.makedirs(storage.Path(dst).parent)
        storage.Path(src).rename(dst)
        return

    def walk(d: storage.Path, rel: str) -> None:
        for child in d.iterdir():
            if child.is_dir():
                walk(child, f"{rel}{child.name}/")
            else:
                storage.copy(child, storage.join(dst, rel + child.name))

    walk(storage.Path(src), "")
    storage.Path(src).rmtree()


def _remove_interrupted_saves(directory: str) -> None:
    """Removes the step directories of saves that never committed (orbax's temporary
    `checkpoint_<step>.orbax-checkpoint-tmp-*`, or on GCS a step without its commit marker),
    saying so: a later save of the same step would otherwise collide with them."""
    for name in storage.listdir(directory):
        m = _STEP_NAME.match(name)
        if not m:
            continue
        path = storage.Path(directory) / name
        interrupted = _TMP_MARK in (m.group(2) or "")
        if m.group(2) is None and not ocp.step.is_path_finalized(path):
            interrupted = True
        if interrupted and path.is_dir():
            path.rmtree()
            logging.warning("%s: removed (a save that was interrupted before it committed)", path)


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
    try:
        write_model_description(directory, config, vocab_file, extra_ids)
        params_dir = storage.join(storage.resolve(directory), PARAMS_DIR)
        with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(params_dir, params, force=True)
            checkpointer.wait_until_finished()
        write_checksums(params_dir)
    except OSError as e:
        raise SaveFailed(f"{directory}: cannot be written ({_os_reason(e)})") from e
    except ValueError as e:  # tensorstore's write errors
        if isinstance(e, UserError):
            raise
        raise SaveFailed(f"{directory}: cannot be written ({_os_reason(e)})") from e


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
        config, vocab_file, extra_ids = read_model_description(directory)

        def restore_params(step: int) -> Any:
            return _restore_params(storage.join(steps[step], PARAMS_DIR), abstract_params)

        step, params = newest_intact(directory, sorted(steps), restore_params)
        return NativeCheckpoint(config, params, vocab_file, extra_ids, step)
    config, vocab_file, extra_ids = read_model_description(described)
    params = _restore_params(storage.join(params_dir, PARAMS_DIR), abstract_params)
    return NativeCheckpoint(config, params, vocab_file, extra_ids, step)


def _restore_params(params_path: str, abstract_params: Any) -> Any:
    """The parameters of an orbax params/ directory, integrity first (CorruptCheckpoint)."""
    if not ocp.step.is_path_finalized(params_path):  # e.g. no commit_success.txt on GCS
        raise UserError(
            f"{params_path}: incomplete parameters (orbax never committed them; an interrupted "
            "save or a partial copy)"
        )
    # A step's checksums cover all its items; a native checkpoint's cover params/ alone.
    parent = storage.Path(params_path).parent
    checked = str(parent) if is_step_dir(parent) else params_path

    def restore() -> Any:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params_path, abstract_params)

    return _restore_step(checked, restore)


def newest_intact(directory: str, steps: list[int], restore: Callable[[int], Any]) -> Any:
    """(step, restore(step)) of the newest step whose restore raises no CorruptCheckpoint; each
    newer one is named in a warning. None when there are no steps; CorruptCheckpoint when none
    is intact (never a silent fresh start)."""
    faults: list[str] = []
    for step in sorted(steps, reverse=True):
        try:
            out = restore(step)
        except CorruptCheckpoint as e:
            faults.append(str(e))
            logging.warning("skipping %s_%d: %s", STEP_PREFIX, step, e)
            continue
        if faults:
            logging.warning(
                "%s: using %s_%d, the newest intact step; skipped %d newer unreadable step(s)",
                directory,
                STEP_PREFIX,
                step,
                len(faults),
            )
        return step, out
    if faults:
        raise CorruptCheckpoint(
            f"{faults[0]} (and no older intact step in {directory}"
            + (f": {len(faults) - 1} more unreadable)" if len(faults) > 1 else ")")
        )
    return None


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
        self._async = async_save
        # orbax's save errors (and its tracebacks) are collected here for the run's lifetime
        self._quiet = _quiet_orbax()
        self._errors = self._quiet.__enter__().errors
        self._saving: dict[str, int] = {}  # directory -> the step its save in flight writes
        self._closed = False
        self.best_metric = best_metric
        self._best = None
        best_dir = storage.join(self.model_dir, BEST_DIR)
        try:
            if jax_process_index() == 0:
                if config is not None:
                    write_model_description(self.model_dir, config, vocab_file, extra_ids)
                _remove_interrupted_saves(self.model_dir)
                if best_metric is not None:
                    if config is not None:
                        write_model_description(best_dir, config, vocab_file, extra_ids)
                    _remove_interrupted_saves(best_dir)
            self._manager = self._orbax_manager(
                self.model_dir, step_prefix=STEP_PREFIX, max_to_keep=max_to_keep
            )
            if best_metric is not None:
                self._best = self._orbax_manager(
                    best_dir,
                    step_prefix=STEP_PREFIX,
                    max_to_keep=1,
                    best_fn=lambda m: float(m[best_metric]),
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                )
        except (OSError, ValueError) as e:
            self._quiet.__exit__()
            if isinstance(e, (UserError, FileNotFoundError, PermissionError)):
                raise
            raise SaveFailed(f"{self.model_dir}: cannot be written ({_os_reason(e)})") from e
        # A run that stops on an error still stops orbax's threads before the interpreter
        # shuts down (else: "sys.meta_path is None" and "Event loop is closed" noise).
        atexit.register(self._close_quietly)

    def _close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _orbax_manager(self, directory: str, **options: Any) -> ocp.CheckpointManager:
        """An orbax manager of `directory` that writes each step's checksums just before it
        commits the step (asynchronous saves; synchronous ones write them after `save`)."""
        async_options = None
        if self._async:
            async_options = ocp.AsyncOptions(
                post_finalization_callback=lambda: self._write_checksums(directory)
            )
        return ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                # We decide when to save (periodic + final); orbax only enforces retention.
                save_interval_steps=1,
                enable_async_checkpointing=self._async,
                async_options=async_options,
                **options,
            ),
        )

    def _write_checksums(self, directory: str) -> None:
        """Checksums of the step being saved in `directory`, in its temporary directory when
        orbax renames at commit (local disks), else in the step directory itself (GCS)."""
        step = self._saving.get(directory)
        if step is None or jax_process_index() != 0:
            return
        name = f"{STEP_PREFIX}_{step}"
        found = [n for n in storage.listdir(directory) if n.startswith(name + _TMP_MARK)]
        write_checksums(storage.join(directory, found[-1] if found else name))

    def latest_step(self) -> int | None:
        """The newest committed step (orbax's test); newer uncommitted ones are named in a
        warning by step_dirs."""
        step_dirs(self.model_dir)  # warns about the skipped ones
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return storage.join(self.model_dir, f"{STEP_PREFIX}_{step}")

    def check(self) -> None:
        """Raises SaveFailed (path and OS error) as soon as a background save has failed, so the
        run stops at once rather than at its next save."""
        if self._errors:
            self._raise_save_failed(self._errors[0])

    def _raise_save_failed(self, error: BaseException) -> None:
        step = self._saving.get(self.model_dir)
        where = self.step_dir(step) if step is not None else self.model_dir
        raise SaveFailed(f"{where}: the checkpoint cannot be written ({_os_reason(error)})") from (
            error
        )

    def _save(self, manager: ocp.CheckpointManager, step: int, **kwargs: Any) -> bool:
        """manager.save, one line when it fails; a synchronous save's checksums after it."""
        directory = str(manager.directory)
        self.check()
        # orbax would wait for the save in flight anyway; before `step` is set for its callback
        self._wait(manager)
        self._saving[directory] = step
        try:
            saved = manager.save(step, **kwargs)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise bare Exception
            if isinstance(e, UserError):
                raise
            self._raise_save_failed(e)
        self.check()
        if saved and not self._async and jax_process_index() == 0:
            try:
                write_checksums(storage.join(directory, f"{STEP_PREFIX}_{step}"))
            except OSError as e:
                self._raise_save_failed(e)
        return saved

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
        return self._save(
            self._manager,
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
        """Restores (params, opt_state, data_state) of `step`, sharded as the abstract trees say;
        its files are verified first (CorruptCheckpoint), then matched against the trees."""

        def restore() -> Any:
            return self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        PARAMS_DIR: ocp.args.StandardRestore(abstract_params),
                        OPT_STATE_DIR: ocp.args.StandardRestore(abstract_opt_state),
                        DATA_STATE_DIR: ocp.args.JsonRestore(),
                    }
                ),
            )

        logged = len(self._errors)
        try:
            out = _restore_step(self.step_dir(step), restore)
        finally:
            del self._errors[logged:]  # what orbax logged about a failed read is not a save error
        data_state = out[DATA_STATE_DIR]
        if not isinstance(data_state, dict) or "batches_consumed" not in data_state:
            path = storage.join(self.step_dir(step), DATA_STATE_DIR)
            raise CorruptCheckpoint(f"{path}: corrupt (no batches_consumed)")
        return out[PARAMS_DIR], out[OPT_STATE_DIR], dict(data_state)

    def restore_newest(
        self, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[int, Any, Any, dict[str, Any]] | None:
        """(step, params, opt_state, data_state) of the newest intact step, None when there is
        none. Each newer unreadable step is named in a warning and moved aside to
        MODEL_DIR/corrupt/ (kept for inspection; the resumed run saves that step again)."""
        steps = sorted(self._manager.all_steps())
        found = newest_intact(
            self.model_dir, steps, lambda s: self.restore(s, abstract_params, abstract_opt_state)
        )
        if found is None:
            return None
        step, (params, opt_state, data_state) = found
        newer = [s for s in steps if s > step]
        if newer and jax_process_index() == 0:
            aside = storage.join(self.model_dir, "corrupt")
            for s in newer:
                target = storage.join(aside, f"{STEP_PREFIX}_{s}-{time.strftime('%Y%m%d-%H%M%S')}")
                _move_tree(self.step_dir(s), target)
                logging.warning("moved %s aside to %s", self.step_dir(s), target)
            self._manager.reload()
        return step, params, opt_state, data_state

    def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
        """Offers `params` at `step` as the best checkpoint; kept if its metric is the best."""
        if self._best is None or self.best_metric not in metrics:
            return
        if step in self._best.all_steps():
            return
        self._save(
            self._best,
            step,
            args=ocp.args.Composite(**{PARAMS_DIR: ocp.args.StandardSave(params)}),
            metrics={self.best_metric: float(metrics[self.best_metric])},
        )

    def wait_until_finished(self) -> None:
        """Waits for the saves in flight; SaveFailed if one failed."""
        self._wait(self._manager)
        if self._best is not None:
            self._wait(self._best)

    def _wait(self, manager: ocp.CheckpointManager) -> None:
        try:
            manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises its thread's error as is
            self._raise_save_failed(e)
        self.check()

    def close(self) -> None:
        """Waits for the saves in flight and stops orbax's threads (left running, they print
        "sys.meta_path is None" noise at exit); SaveFailed if a save failed."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        finally:
            try:
                self._manager.close()
                if self._best is not None:
                    self._best.close()
            except Exception:  # noqa: BLE001 - the save's own error is the one to report
                pass
            self._quiet.__exit__()


def jax_process_index() -> int:
    import jax

    return jax.process_index()
