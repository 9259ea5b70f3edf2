"""The Distilling Step-by-Step reference training step, in plain PyTorch + Hugging Face T5.

Written from the description of the paper's released code (a Seq2SeqTrainer subclass), not copied:
each batch row is one example with two parts, "predict" (input -> label) and "explain"
(input -> rationale); each part is padded to its own longest sequence in the batch, as
DataCollatorForSeq2Seq does (inputs with 0, labels with -100); the model runs two forward passes,
loss = alpha * label_loss + (1 - alpha) * rationale_loss, each Hugging Face's token-mean
cross-entropy; then backward, gradient clipping at 1.0 (the Trainer's default max_grad_norm) and an
AdamW step (lr 5e-5, weight decay 0). On an accelerator: bf16 as the Trainer's `--bf16` runs it
(float32 weights and optimizer, the forward passes under torch.autocast) and PyTorch's scaled
dot-product attention (`attn_implementation="sdpa"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import transformers

from distill_sbs import convert
from distill_sbs.network import T5Config

IGNORE_INDEX = -100  # DataCollatorForSeq2Seq's label padding


@dataclass(frozen=True)
class DssExample:
    """One DSS example: token ids (EOS included) of both parts."""

    label_input: np.ndarray  # "[label] <input>" (the reference's "predict: <input>")
    label: np.ndarray
    rationale_input: np.ndarray  # "[rationale] <input>" (the reference's "explain: <input>")
    rationale: np.ndarray


def hf_t5(
    config: T5Config, attn_implementation: str | None = None
) -> transformers.T5ForConditionalGeneration:
    """Randomly initialised HF T5 of `config`'s shape and dropout (float32, training mode, CPU)."""
    hf = convert.t5config_to_hf_config(config)
    hf.pop("architectures")
    hf.pop("model_type")
    hf_config = transformers.T5Config(**hf)
    if attn_implementation:
        hf_config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(hf_config).train()


def t5_1_1_small(dropout_rate: float) -> transformers.T5ForConditionalGeneration:
    """Randomly initialised HF T5 of the t5_1_1 small shape (float32, training mode)."""
    return hf_t5(T5Config(dropout_rate=dropout_rate))


def _pad(rows: Sequence[np.ndarray], value: int) -> torch.Tensor:
    """[len(rows), longest] int64, padded on the right (dynamic padding)."""
    out = np.full((len(rows), max(len(r) for r in rows)), value, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def collate(
    examples: Sequence[DssExample], device: str | torch.device = "cpu"
) -> dict[str, dict[str, torch.Tensor]]:
    """The two padded model inputs of one batch on `device`: {"pred": {...}, "expl": {...}}."""

    def part(inputs: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, torch.Tensor]:
        ids = _pad(inputs, 0)
        out = {
            "input_ids": ids,
            "attention_mask": (ids != 0).long(),
            "labels": _pad(labels, IGNORE_INDEX),
        }
        return {k: v.to(device, non_blocking=True) for k, v in out.items()}

    return {
        "pred": part([e.label_input for e in examples], [e.label for e in examples]),
        "expl": part([e.rationale_input for e in examples], [e.rationale for e in examples]),
    }


class ReferenceDssTrainer:
    """model + AdamW; `step(batch)` is one DSS training step on a collated batch."""

    def __init__(
        self,
        model: transformers.T5ForConditionalGeneration,
        *,
        alpha: float = 0.5,
        learning_rate: float = 5e-5,
        max_grad_norm: float = 1.0,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.device_type = next(model.parameters()).device.type
        self.autocast = autocast  # e.g. torch.bfloat16: mixed precision, float32 weights
        self.alpha = alpha
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )

    def step(self, batch: dict[str, dict[str, torch.Tensor]]) -> float:
        # Two forward passes, as the reference's compute_loss: one per task prefix.
        with torch.autocast(self.device_type, self.autocast, enabled=self.autocast is not None):
            label_loss = self.model(**batch["pred"]).loss
            rationale_loss = self.model(**batch["expl"]).loss
            loss = self.alpha * label_loss + (1.0 - self.alpha) * rationale_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # waits for the device
