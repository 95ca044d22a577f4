"""The first optimiser step's gradients, saved by rank 0 of a multi-process test script."""

from collections.abc import Callable

import lightning as L
import torch


class FirstStepGrads(L.Callback):
    """Before the first optimiser step, rank 0 saves `{"grads", "world_size", **extra(module)}` to `out`.

    Gradients are the backbone's, full tensors (an FSDP2 shard is gathered first), keyed by
    `prefix` + parameter name.
    """

    def __init__(self, out: str, prefix: str = "", extra: Callable[[L.LightningModule], dict] | None = None) -> None:
        self.out, self.prefix, self.extra = out, prefix, extra

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != 0:
            return
        grads = {}
        for name, p in pl_module.backbone.named_parameters():
            g = p.grad
            grads[self.prefix + name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        if trainer.is_global_zero:
            extra = self.extra(pl_module) if self.extra else {}
            torch.save({"grads": grads, "world_size": trainer.world_size, **extra}, self.out)
