"""Runs a script or code with TensorFlow and SeqIO unimportable, as on a GPU host without them:

    python -m _no_tensorflow benchmarks/train_benchmark.py --mode a ...
    python -m _no_tensorflow -c "code"

Importing tensorflow, tensorflow_text, tensorflow_datasets or seqio raises ModuleNotFoundError.
`random_examples` and `train_losses` are the two sides' shared inputs and training (a few steps
of the tiny T5), so a test compares the losses from either process."""

from __future__ import annotations

import importlib.abc
import os
import runpy
import sys
from typing import Any

BLOCKED = ("tensorflow", "tensorflow_text", "tensorflow_datasets", "seqio")


class _Hiding(importlib.abc.MetaPathFinder):
    """One of the import system's finders, blind to the blocked packages: for them every
    finder answers None, so `import` raises ModuleNotFoundError and importlib.util.find_spec
    returns None, as where they are not installed (torch probes for tensorflow that way)."""

    def __init__(self, finder: Any) -> None:
        self.finder = finder

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args: Any, **kwargs: Any) -> Any:  # importlib.metadata
        find = getattr(self.finder, "find_distributions", None)
        return find(*args, **kwargs) if find else iter(())

    def invalidate_caches(self) -> None:
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


def block() -> None:
    """From now on the blocked packages cannot be imported (also one already imported)."""
    for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[name]
    sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]


def random_examples(n: int, lengths: dict[str, int], seed: int = 0) -> list[dict]:
    """Two-objective examples of random ids within `lengths` (EOS last), ids below 64."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seqs = [rng.integers(2, 64, rng.integers(1, lengths[k])) for k in ("inputs", "targets")]
        inputs, targets = (np.append(x, 1).astype(np.int32) for x in seqs)
        out.append({"inputs": inputs, "targets": targets, "objective_id": i % 2})
    return out


def train_losses(batches: list[dict]) -> list[float]:
    """The loss of each train step of _tiny_t5.TINY (dropout on, AdamW) over `batches`."""
    import jax
    from _tiny_t5 import TINY

    from distill_sbs import optimizers, partitioning
    from distill_sbs.models import EncoderDecoderModel
    from distill_sbs.trainer import Trainer

    optimizer, _ = optimizers.create_optimizer("adamw", learning_rate=1e-2, grad_clip_norm=1.0)
    partitioner = partitioning.create_partitioner()
    trainer = Trainer(EncoderDecoderModel(TINY), optimizer, partitioner, [0.5, 0.5])
    state = trainer.init_state(jax.random.PRNGKey(0))
    losses = []
    for batch in batches:
        state, metrics = trainer.train_step(state, partitioner.host_batch_to_global(batch))
        losses.append(float(metrics["loss_sum"]))
    return losses


def main() -> None:
    block()
    if sys.argv[1] == "-c":
        code = sys.argv[2]
        sys.argv = ["-c", *sys.argv[3:]]
        exec(compile(code, "<-c>", "exec"), {"__name__": "__main__"})
        return
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
