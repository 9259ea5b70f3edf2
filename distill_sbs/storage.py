"""Every path the project reads or writes, local or remote (gs://...), through `etils.epath`.

    storage.Path("gs://bucket/run") / "config.json"      # an epath.Path (orbax uses the same)
    storage.read_json(path) / storage.write_text(path, s) # errors name the path
    storage.resolve(path)                                  # absolute if local, a URL unchanged
    storage.local_file(path)                               # a local file name for libraries that
                                                           # only open local files (sentencepiece,
                                                           # safetensors' mmap, torch.load)

With TensorFlow installed epath reaches gs:// through tf.io.gfile; with EPATH_USE_TF=0 through
fsspec/gcsfs (what the tests use to reach a GCS emulator on loopback).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any

from etils import epath

Path = epath.Path
PathLike = epath.PathLike


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local file name."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
    """A local path made absolute (with ~ expanded); a URL unchanged (gs://b/x stays gs://b/x)."""
    text = os.fspath(path)
    if is_remote(text):
        return text
    return os.fspath(epath.Path(text).expanduser().resolve())


def join(path: PathLike, *parts: str) -> str:
    """`path/part/...` as a string; keeps a URL's `//` (a path normalisation would not)."""
    return os.fspath(epath.Path(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
    return epath.Path(path).exists()


def isdir(path: PathLike) -> bool:
    return epath.Path(path).is_dir()


def isfile(path: PathLike) -> bool:
    p = epath.Path(path)
    return p.exists() and not p.is_dir()


def listdir(path: PathLike) -> list[str]:
    """The names in a directory (sorted); [] if it does not exist."""
    p = epath.Path(path)
    if not p.is_dir():
        return []
    return sorted(child.name for child in p.iterdir())


def makedirs(path: PathLike) -> None:
    """Makes a local directory and its parents. An object store (gs://) has no directories: its
    bucket is checked instead (never created, as a file system's mkdir of the bucket would)."""
    if is_remote(path):
        check_bucket(path)
        return
    epath.Path(path).mkdir(parents=True, exist_ok=True)


_checked_buckets: set[str] = set()


def check_bucket(path: PathLike) -> None:
    """Raises FileNotFoundError naming `path` when its bucket does not exist or cannot be read."""
    text = os.fspath(path)
    scheme, _, rest = text.partition("://")
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if bucket in _checked_buckets:
        return
    try:
        found = epath.Path(bucket).exists()
    except Exception as e:  # noqa: BLE001 - each client raises its own error types
        raise FileNotFoundError(f"{text}: bucket {bucket} cannot be read ({e})") from e
    if not found:
        raise FileNotFoundError(f"{text}: bucket {bucket} does not exist or is not accessible")
    _checked_buckets.add(bucket)


def _current(path: PathLike) -> epath.Path:
    """`path`, with fsspec's cached listing of it dropped: gcsfs would otherwise read a file that
    another process rewrote since this one listed it at its old size (a cut-off last line)."""
    p = epath.Path(path)
    backend = getattr(p, "_backend", None)
    if is_remote(path) and backend is epath.backend.fsspec_backend:
        backend.fs(os.fspath(path)).invalidate_cache(os.fspath(path))
    return p


def read_text(path: PathLike) -> str:
    """The text of a file; FileNotFoundError naming the path when it is missing."""
    p = _current(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not found") from e


def read_bytes(path: PathLike) -> bytes:
    p = _current(path)
    try:
        return p.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not found") from e


def read_json(path: PathLike) -> Any:
    """A JSON file's value; ValueError naming the path if it is not valid JSON."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def write_text(path: PathLike, text: str) -> None:
    """Writes a whole file so that a reader sees the old file or the new one, never half of it.

    Locally: a temporary sibling, then an atomic rename. On object stores (gs://) one upload is
    already all-or-nothing.
    """
    p = epath.Path(path)
    if is_remote(path):
        check_bucket(path)  # names the file, not its folder
        p.write_text(text, encoding="utf-8")
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(p)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Like write_text, for bytes."""
    p = epath.Path(path)
    if is_remote(path):
        check_bucket(path)  # names the file, not its folder
        p.write_bytes(data)
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_bytes(data)
        tmp.replace(p)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2))


def copy(src: PathLike, dst: PathLike) -> None:
    """Copies one file, local or remote on either side, streaming (never whole in memory)."""
    if is_remote(dst):
        check_bucket(dst)
    else:
        epath.Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with _current(src).open("rb") as fin, epath.Path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


@functools.cache
def _download_dir() -> str:
    directory = tempfile.mkdtemp(prefix="distill_sbs-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


@functools.cache
def local_file(path: str) -> str:
    """A local file name holding `path`'s bytes: `path` itself when local, else a copy downloaded
    once per process into a temporary directory removed at exit. For libraries that open only
    local files (sentencepiece through seqio's tf.io.gfile, safetensors' mmap, torch.load)."""
    if not is_remote(path):
        return path
    if not exists(path):
        raise FileNotFoundError(f"{path}: not found")
    name = epath.Path(path).name
    dest = epath.Path(tempfile.mkdtemp(dir=_download_dir())) / name
    copy(path, dest)
    return os.fspath(dest)


class LocalMirror:
    """A local directory copied file by file to a remote one on `push()`.

    For writers that append (TensorBoard's tf.summary writes through tf.io.gfile; JSON lines),
    which an object store cannot do: they write here, and each changed file is uploaded whole.
    """

    def __init__(self, remote: str, pull: tuple[str, ...] = ()) -> None:
        self.remote = remote
        self.local = tempfile.mkdtemp(dir=_download_dir())
        self._pushed: dict[str, tuple[int, int]] = {}
        for name in pull:  # files the writers go on appending to (e.g. after a resume)
            if exists(join(remote, name)):
                copy(join(remote, name), join(self.local, name))
                self._pushed[name] = self._stamp(epath.Path(self.local) / name)

    @staticmethod
    def _stamp(path: epath.Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def push(self) -> None:
        """Uploads every file that changed since the last push."""
        root = pathlib.Path(self.local)  # our own local directory
        for path in root.rglob("*"):
            if path.is_dir():
                continue
            name = os.fspath(path.relative_to(root))
            stamp = self._stamp(path)
            if self._pushed.get(name) != stamp:
                copy(path, join(self.remote, name))
                self._pushed[name] = stamp
