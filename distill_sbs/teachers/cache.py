"""Append-only JSONL cache of finished teacher requests, so a killed run pays for nothing twice.

Each line is one finished request: {"key", "text", "prompt_tokens", "completion_tokens", "meta"}.
The key hashes (example id, teacher name, prompt text, sample index, generation parameters); the
API key is never part of a line. Every line is flushed and fsynced before the next request is
accounted for, so after a SIGKILL at most the line being written is torn; a torn last line is cut
off when the cache is reopened.

A remote cache (gs://...) is kept in a local copy (object stores cannot append) uploaded whole at
most every PUSH_EVERY_S seconds and at close: a SIGKILL loses at most that many seconds of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from typing import Any

from distill_sbs import storage

PUSH_EVERY_S = 30.0


def request_key(
    example_id: str, teacher: str, prompt: str, sample_index: int, params: dict[str, Any]
) -> str:
    """The cache key of one request: sha256 over its canonical JSON description."""
    desc = json.dumps(
        [example_id, teacher, prompt, sample_index, params], sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(desc.encode("utf-8")).hexdigest()


class CacheError(ValueError):
    pass


class RequestCache:
    """A dict of finished requests backed by an append-only JSONL file."""

    def __init__(self, path: str):
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.torn_lines_dropped = 0
        self._mirror = None
        self._local = path
        if storage.is_remote(path):
            name = storage.Path(path).name
            self._mirror = storage.LocalMirror(str(storage.Path(path).parent), pull=(name,))
            self._local = storage.join(self._mirror.local, name)
        self._pushed_at = time.monotonic()
        storage.makedirs(storage.Path(self._local).parent)
        self._load()
        self._file = storage.Path(self._local).open("a", encoding="utf-8")

    def _load(self) -> None:
        local = storage.Path(self._local)
        if not local.exists():
            return
        data = local.read_bytes()
        lines = data.split(b"\n")
        # The last element is b"" when the file ends with a newline; otherwise it is a line the
        # previous run was killed while writing.
        good_end = len(data) - len(lines[-1])
        for lineno, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = entry["key"]
            except (ValueError, KeyError, TypeError):
                raise CacheError(
                    f"{self.path}:{lineno}: not a cache entry; the cache file is corrupt "
                    "(only a torn last line is repaired)"
                ) from None
            self._entries[key] = entry
        if lines[-1]:
            try:
                entry = json.loads(lines[-1])
                self._entries[entry["key"]] = entry
                good_end = len(data)  # complete JSON, only the newline was lost
                with local.open("ab") as f:
                    f.write(b"\n")
            except (ValueError, KeyError, TypeError):
                self.torn_lines_dropped = 1
                # Rewrite the good part whole (a temporary file renamed over the cache), rather
                # than truncating in place: the cache is always a local file (see __init__).
                storage.write_bytes(self._local, data[:good_end])

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self._entries.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Appends one finished request and makes it durable before returning."""
        entry = {"key": key, **entry}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._entries[key] = entry
            if self._mirror is not None and time.monotonic() - self._pushed_at > PUSH_EVERY_S:
                self._mirror.push()
                self._pushed_at = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
                if self._mirror is not None:
                    self._mirror.push()

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
