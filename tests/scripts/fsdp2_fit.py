"""Two-process FSDP2 (llmstages FSDP2Strategy, a ModelParallelStrategy) fit on CPU with gloo; run by tests/test_distributed.py.

Lightning's subprocess launcher re-runs this script for rank 1, so it must be a
plain script, not a pytest process. Rank 0 writes the full (gathered) state dict
after the first optimiser step's gradients, plus the losses it saw, to argv[1].
"""

import sys

import lightning as L
import torch

from llmstages.data import SFTData
from llmstages.stages import SFTModule
from llmstages.strategies import FSDP2Strategy

from grad_capture import FirstStepGrads  # tests/scripts, this script's folder


def main(out: str, cache: str, devices: int) -> None:
    torch.manual_seed(0)
    data = SFTData(cache_dir=cache, batch_size=8 // devices, seq_len=128, packing="none", shuffle=False)
    model = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=2, max_new_tokens=3)
    model.load_state_dict(torch.load(f"{cache}/init.pt"), strict=True)
    strategy = FSDP2Strategy() if devices > 1 else "auto"  # what configs/fragments/fsdp.yaml ships
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, num_sanity_val_steps=0, callbacks=[FirstStepGrads(out)],
    )
    trainer.fit(model, data)
    # SFT validation generates on every rank: under FSDP2 each forward all-gathers, so a
    # rank-zero-only generation would hang here
    metrics = trainer.validate(model, data, verbose=False)[0]
    if trainer.is_global_zero:
        saved = torch.load(out, weights_only=False)
        torch.save({**saved, "stop_rate": metrics["val/stop_rate"]}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
