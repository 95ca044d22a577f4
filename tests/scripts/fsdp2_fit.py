"""Two-process FSDP2 (ModelParallelStrategy) fit on CPU with gloo; run by tests/test_distributed.py.

Lightning's subprocess launcher re-runs this script for rank 1, so it must be a
plain script, not a pytest process. Rank 0 writes the full (gathered) state dict
after the first optimiser step's gradients, plus the losses it saw, to argv[1].
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from llmstages.data.modules import SFTData
from llmstages.stages import SFTModule


class CaptureGrads(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != 0:
            return
        grads = {}
        for name, p in pl_module.backbone.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        if trainer.is_global_zero:
            torch.save({"grads": grads, "world_size": trainer.world_size}, self.out)


def main(out: str, cache: str, devices: int) -> None:
    torch.manual_seed(0)
    data = SFTData(cache_dir=cache, batch_size=8 // devices, seq_len=128, packing="none", shuffle=False)
    model = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    model.load_state_dict(torch.load(f"{cache}/init.pt"), strict=True)
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[CaptureGrads(out)],
    )
    trainer.fit(model, data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
