"""#19: losing more than 10% of a data set (dropped or truncated) is a warning at start that says how many,
why, and which option changes it; below that, the usual info line only."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from llmstages.data import PreferenceData, SFTData
from llmstages.data.data_loss import LOUD_FRACTION, describe_loss


def test_threshold_counts_and_hints() -> None:
    settings = {"seq_len": 256, "truncation": "right"}
    assert LOUD_FRACTION == 0.10
    assert describe_loss("sft data", 10, {"truncated": 1}, settings) is None  # 10%: not more than the threshold
    text = describe_loss("sft data", 10, {"truncated": 1, "invalid_json": 1}, settings)
    assert text.startswith("sft data: 2 of 10 records (20%) lost or cut: ")
    assert "1 truncated (cut to seq_len (256) with truncation: right; raise seq_len" in text
    assert "1 invalid_json (bad records skipped by on_error: skip" in text
    assert describe_loss("x", 0, {}, settings) is None


def _setup_warnings(data) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
        data.setup("fit")  # built once: warned once
    return [str(w.message) for w in caught if "lost or cut" in str(w.message)]


def test_dpo_demo_at_a_short_seq_len_is_loud(shared_data: Path, cache_dir: str) -> None:
    path = shared_data / "llamafactory" / "dpo_en_demo.json"
    data = PreferenceData(files=[str(path)], seq_len=128, cache_dir=cache_dir)
    messages = _setup_warnings(data)
    # An independent count: a pair is lost or cut when its prompt plus longer reply exceeds seq_len.
    over = 0
    from llmstages.data.formats import read_preference

    pairs, _ = read_preference(path)
    for pair in pairs:
        prompt, replies = data.template.encode_pair(pair["prompt"], {s: pair[s] for s in ("chosen", "rejected")}, data.tokenizer)
        over += len(prompt) + max(len(r["input_ids"]) for r in replies.values()) > 128
    assert over > 30  # the premise: far more than 10% of 300
    assert messages == [data.data_loss]
    assert data.data_loss.startswith(f"preference data: {over} of 300 records")
    assert "reply_truncated_away (no reply token left within seq_len (128); raise seq_len" in data.data_loss


@pytest.mark.parametrize("seq_len,loud", [(48, True), (512, False)])
def test_sft_truncation_is_loud_only_above_the_threshold(tmp_path: Path, cache_dir: str, seq_len: int, loud: bool) -> None:


    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "word " * (5 * i)},
                          {"role": "assistant", "content": "An answer."}]} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = SFTData(files=[str(path)], seq_len=seq_len, truncation="left", packing="none", val_fraction=0, cache_dir=cache_dir)
    messages = _setup_warnings(data)
    if loud:
        assert messages == [data.data_loss] and "of 20 records" in data.data_loss
        assert f"truncated (cut to seq_len ({seq_len}) with truncation: left; raise seq_len" in data.data_loss
        assert data.truncated > 2
    else:
        assert messages == [] and data.data_loss is None and data.truncated == 0
