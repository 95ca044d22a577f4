"""The frozen reference: the initial policy that DPO, KTO and GRPO compare the policy against.

Design choices:
- The reference is the policy's initial weights, after `init_from`: a deep copy in eval mode,
  without gradients, or, when the policy trains LoRA adapters, no copy at all: the policy with
  its adapters disabled (the frozen base weights are the initial policy).
- It is never a registered submodule (`FrozenReference` is a plain object held by the stage), so
  it is outside `state_dict`, the optimiser, DDP/FSDP wrapping and checkpoints. A checkpoint
  load rebuilds it from `init_from` *before* the trained weights are loaded
  (`ReferenceStage.on_load_checkpoint`), so a resumed or validated run compares against the
  same initial policy.
- A stage that precomputes the reference's numbers (DPO `reference: precompute`) frees the copy
  afterwards (`FrozenReference.free`); `ReferenceStage.needs_reference` says when a stage needs
  one at all (DPO: not SimPO, not once precomputed; KTO: always; GRPO: `beta > 0`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from llmstages.model.lora import lora_disabled
from llmstages.model.transformer import Transformer
from llmstages.stages.base import LMStage

__all__ = ["FrozenReference", "ReferenceStage"]


class FrozenReference:
    """The initial policy, frozen: a deep copy, or (LoRA) the policy with its adapters off."""

    def __init__(self, adapters_off: bool) -> None:
        self.adapters_off = adapters_off
        self.copy: Transformer | None = None

    def build(self, backbone: Transformer) -> None:
        """Freeze `backbone`'s current weights as the reference (once; nothing to copy under LoRA)."""
        if not self.adapters_off and self.copy is None:
            self.copy = copy.deepcopy(backbone).eval().requires_grad_(False)

    def available(self) -> bool:
        return self.adapters_off or self.copy is not None

    def free(self) -> None:
        """Drop the copy (its numbers were precomputed)."""
        self.copy = None

    def to(self, device) -> None:
        if self.copy is not None:
            self.copy.to(device)

    @contextlib.contextmanager
    def model(self, backbone: Transformer) -> Iterator[Transformer]:
        """The reference for a forward pass: the copy, or `backbone` with its LoRA adapters disabled."""
        if not self.adapters_off:
            yield self.copy
            return
        with lora_disabled(backbone):
            yield backbone


class ReferenceStage(LMStage):
    """An `LMStage` trained against a frozen reference of its initial policy: the reference's lifecycle."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.frozen_reference = FrozenReference(adapters_off=self.lora is not None)

    def needs_reference(self) -> bool:
        """Whether this stage compares against the reference (and so builds it)."""
        raise NotImplementedError

    @property
    def _reference(self) -> Transformer | None:
        """The frozen copy (None under LoRA, when not needed, or once freed)."""
        return self.frozen_reference.copy

    def build_reference(self) -> None:
        if self.needs_reference():
            self.frozen_reference.build(self.backbone)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # init_from first: the reference copies the initial policy
        self.build_reference()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # called before the checkpoint's weights load: the backbone still holds its initial weights
        # (init_from when set, or the constructor's), never the trained policy
        if self.hparams.init_from is not None:
            self.load_initial_weights()
        self.build_reference()
        super().on_load_checkpoint(checkpoint)

    def on_fit_start(self) -> None:
        self.frozen_reference.to(self.device)

    def on_validation_start(self) -> None:
        self.frozen_reference.to(self.device)
