"""FSDP2 as a Lightning strategy, CPU included.

Lightning's `FSDPStrategy` (FSDP1) refuses the CPU (Lightning #21812);
`ModelParallelStrategy` runs FSDP2 anywhere but, with `data_parallel_size:
auto`, sizes the data-parallel mesh by the number of *nodes*, so one node with
two devices fails its mesh check, and `auto`/`auto` silently makes every rank
tensor-parallel with no gradient reduction. `FSDP2Strategy` is that strategy
with every rank data-parallel (the stages apply `fully_shard`; no tensor
parallelism) and single-file checkpoints, so a checkpoint feeds `init_from`
and `llmstages export` exactly like a DDP one. Single-file checkpoints go through
the trainer's CheckpointIO (atomic in llmstages); a file that cannot be read is
reported with its path before the load.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy

from llmstages.checkpointing import check_checkpoint_file


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs) -> None:
        """
        Args:
            save_distributed_checkpoint: True writes a sharded checkpoint folder (faster for big
                models; convert with torch.distributed.checkpoint before `init_from`/`export`).
        """
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint, **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, *args, **kwargs):
        path = Path(checkpoint_path)
        if not path.is_dir():  # a sharded checkpoint is a folder, read by torch.distributed.checkpoint
            check_checkpoint_file(path)
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)
