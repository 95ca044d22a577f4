"""Throughput is reported as all tokens/s and labelled tokens/s from measured durations."""

import lightning as L
import pytest
import torch

from llmstages.callbacks import ThroughputMonitor, batch_tokens
from llmstages.data import SFTData
from llmstages.stages import SFTModule


def test_batch_tokens_counts_padding_in_all_but_not_in_labelled():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]),
        "labels": torch.tensor([[-100, -100, 7, -100, -100], [-100, 6, 7, 8, -100]]),
    }
    assert batch_tokens(batch) == (10, 4)
    preference = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in batch.items()}
    assert batch_tokens(preference) == (20, 8)


def test_monitor_logs_both_rates_from_measured_time(tmp_path):
    data = SFTData(cache_dir=str(tmp_path), batch_size=4, seq_len=128, packing="documents")
    model = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    monitor = ThroughputMonitor(window=3, peak_flops=1e12)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[monitor],
    )
    trainer.fit(model, data)
    m = monitor.last_metrics
    assert 0 < m["perf/labelled_tokens_per_sec"] < m["perf/tokens_per_sec"]
    assert m["perf/labelled_fraction"] == pytest.approx(m["perf/labelled_tokens_per_sec"] / m["perf/tokens_per_sec"])
    # MFU from the model's FLOPs per token, the measured rate and the given peak
    expected = model.backbone.flops_per_token(128) * m["perf/tokens_per_sec"] / 1e12
    assert m["perf/mfu"] == pytest.approx(expected)
