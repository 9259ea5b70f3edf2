"""The storage layer: no os.path / open() on a user path in the package, whole-file writes, the
local mirror, and step directories complete only by orbax's commit (fallback with a warning)."""

from __future__ import annotations

import logging
import pathlib
import re

import jax
import numpy as np
import optax
import pytest
from _tiny_t5 import tiny_config

import distill_sbs
from distill_sbs import checkpoints, storage

PACKAGE = pathlib.Path(distill_sbs.__file__).parent

# Where the package may still use os.path or a bare open(), each with its reason. Lines that
# name __file__ (paths inside the installed package) are allowed everywhere.
ALLOWED = {
    ("cli.py", "os.path."): "gin file search: gin opens gin files itself with open() (local only)",
    ("annotate.py", "open(os.devnull"): "the null device, not a user path",
}
_PATTERN = re.compile(r"os\.path\.|(?<![\w.])open\(")


def test_no_os_path_or_open_on_user_paths():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if not _PATTERN.search(code) or "__file__" in code:
                continue
            if any(rel == f and key in code for (f, key) in ALLOWED):
                continue
            offenders.append(f"distill_sbs/{rel}:{lineno}: {line.strip()}")
    assert not offenders, "use distill_sbs.storage instead:\n" + "\n".join(offenders)


def test_the_grep_finds_what_it_should():
    # The pattern must catch both forms and leave epath's .open() and names like reopen( alone.
    assert _PATTERN.search("x = os.path.join(a, b)")
    assert _PATTERN.search("with open(p) as f:")
    assert not _PATTERN.search("storage.Path(p).open('a')")
    assert not _PATTERN.search("reopen(x)")


def test_write_text_is_whole_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "out.json"
    storage.write_json(target, {"a": 1})
    storage.write_text(target, "replaced")
    assert target.read_text() == "replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        storage.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        storage.read_json(tmp_path / "bad.json")


def test_resolve_and_join_keep_urls():
    assert storage.resolve("gs://b/x/../y") == "gs://b/x/../y"
    assert storage.join("gs://b/run", "checkpoint_4") == "gs://b/run/checkpoint_4"
    assert storage.resolve("rel").startswith("/")


def test_local_mirror_pushes_changed_files_and_pulls_existing(tmp_path):
    remote = tmp_path / "remote"
    storage.write_text(remote / "log.jsonl", "old\n")
    mirror = storage.LocalMirror(str(remote), pull=("log.jsonl",))
    local = pathlib.Path(mirror.local)
    assert (local / "log.jsonl").read_text() == "old\n"
    with open(local / "log.jsonl", "a") as f:
        f.write("new\n")
    (local / "train").mkdir()
    (local / "train" / "events").write_bytes(b"\x00\x01")
    mirror.push()
    assert (remote / "log.jsonl").read_text() == "old\nnew\n"
    assert (remote / "train" / "events").read_bytes() == b"\x00\x01"


def _save_steps(model_dir: str, steps: list[int]) -> dict:
    from distill_sbs.models import EncoderDecoderModel

    cfg = tiny_config()
    mgr = checkpoints.CheckpointManager(model_dir, config=cfg, async_save=False)
    saved = {}
    for step in steps:
        params = EncoderDecoderModel(cfg).init_params(jax.random.PRNGKey(step))
        mgr.save(step, params, optax.sgd(0.1).init(params), {"batches_consumed": step}, True)
        saved[step] = params
    mgr.close()
    return saved


def test_uncommitted_newest_step_is_skipped_with_a_warning(tmp_path, caplog):
    """An interrupted save leaves orbax's temporary directory: loading and resuming fall back to
    the newest committed step and say which one they skipped."""
    model_dir = tmp_path / "run"
    saved = _save_steps(str(model_dir), [2, 4])
    # What a save killed before orbax's final rename leaves behind.
    partial = model_dir / "checkpoint_4.orbax-checkpoint-tmp-1700000000"
    (model_dir / "checkpoint_4").rename(partial)
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoints.load_native(str(model_dir))
    assert ckpt.step == 2
    for a, b in zip(jax.tree.leaves(ckpt.params), jax.tree.leaves(saved[2]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert str(partial) in caplog.text and "incomplete checkpoint" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mgr = checkpoints.CheckpointManager(str(model_dir), config=tiny_config())
        assert mgr.latest_step() == 2
        mgr.close()
    assert str(partial) in caplog.text
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        checkpoints.load_native(str(partial))
