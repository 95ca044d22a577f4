"""`llmstages data prepare`: the ids of a plain encode loop, the same bytes for any worker count, resume after
a kill, bad records named by file/line/field, a folder of other inputs refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clirun import run
from llmstages.data import synthetic
from llmstages.data.base import default_tokenizer
from llmstages.data.formats import DataFormatError
from llmstages.data.shards import ShardError, prepare_shards
from llmstages.data.shards import prepare as prepare_module


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return default_tokenizer(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def corpus(tmp_path):
    docs = synthetic.pretrain_corpus(seed=3)[:400]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(prepare_module, "CHUNK_DOCS", 37)  # many chunks, shards cut inside chunks


def shard_bytes(folder):
    index = json.loads((folder / "index.json").read_text())
    return [(folder / s["file"]).read_bytes() for s in index["shards"]], index


def test_shards_hold_every_documents_ids_then_eos_and_do_not_depend_on_workers(tmp_path, corpus, tokenizer):
    path, docs = corpus
    one = prepare_shards([path], tokenizer, tmp_path / "one", shard_tokens=1000, workers=1, progress=False)
    two = prepare_shards([path], tokenizer, tmp_path / "two", shard_tokens=1000, workers=2, progress=False)
    (a, index), (b, _) = shard_bytes(one), shard_bytes(two)
    assert a == b and len(a) > 3
    expected = [t for d in docs for t in [*tokenizer.encode(d), tokenizer.eos_id]]  # the plain loop
    tokens = np.concatenate([np.frombuffer(x, dtype=index["dtype"]) for x in a])
    assert tokens.tolist() == expected
    assert [s["tokens"] for s in index["shards"]][:-1] == [1000] * (len(a) - 1)
    assert index["documents"] == len(docs) == sum(s["documents"] for s in index["shards"])
    assert index["tokens"] == len(expected) and index["kept"] == len(docs)


def test_a_killed_preparation_continues_after_its_last_complete_shard(tmp_path, corpus, tokenizer, monkeypatch):
    path, _ = corpus
    full = prepare_shards([path], tokenizer, tmp_path / "full", shard_tokens=700, workers=1, progress=False)
    reference, index = shard_bytes(full)
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    # what a SIGKILL during shard 3 leaves: shards 0-2 complete, a temporary file, no later shard, no index
    for later in range(3, len(reference)):
        (killed / f"shard-{later:05d}.bin.json").unlink()
        if later > 3:
            (killed / f"shard-{later:05d}.bin").unlink()
    (killed / "index.json").unlink()
    (killed / ".shard-00003.bin.tmp999").write_bytes(b"partial")
    encoded = []
    original = prepare_module.encode_chunk
    monkeypatch.setattr(prepare_module, "encode_chunk", lambda docs: encoded.append(len(docs)) or original(docs))
    prepare_shards([path], tokenizer, killed, shard_tokens=700, workers=1, progress=False)
    again, index_again = shard_bytes(killed)
    assert again == reference and index_again == index
    chunks = -(-400 // 37)
    assert 0 < len(encoded) < chunks  # the chunks before shard 3 were not encoded again


@pytest.mark.slow  # ~40 s; the test above covers the same resume from what a kill leaves, in-process
def test_console_prepare_resumes_after_sigkill(tmp_path, tokenizer):
    """A real SIGKILL of `llmstages data prepare` (killed once its first shards are on disk), then a rerun."""
    import signal
    import subprocess
    import time

    from clirun import LLMSTAGES, env

    text = tmp_path / "big.txt"
    docs = synthetic.pretrain_corpus(seed=5)
    text.write_text("\n".join(docs * 12) + "\n")
    args = ["data", "prepare", "--files", str(text), "--shard-tokens", "2000", "--workers", "2",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    ok_run = run([*args, "--out", str(tmp_path / "full")], tmp_path, timeout=180)
    assert ok_run.returncode == 0, ok_run.stderr[-2000:]
    reference, _ = shard_bytes(tmp_path / "full")
    proc = subprocess.Popen([LLMSTAGES, *args, "--out", str(tmp_path / "killed")], cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "shard-00002.bin.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no shard written within 120 s"
        time.sleep(0.05)
    finished_first = proc.poll() is not None
    if not finished_first:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    resumed = run([*args, "--out", str(tmp_path / "killed")], tmp_path, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert shard_bytes(tmp_path / "killed")[0] == reference
    if finished_first:
        pytest.skip("the preparation finished before it could be killed (the rerun was still checked)")


def test_bad_record_is_named_by_file_line_and_field(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n{"text": "fine again"}\n')
    with pytest.raises(DataFormatError) as err:
        prepare_shards([bad], tokenizer, tmp_path / "out", workers=1, progress=False)
    assert (err.value.path, err.value.index, err.value.field) == (bad, 2, "text")
    skipped = prepare_shards([bad], tokenizer, tmp_path / "skip", on_error="skip", workers=1, progress=False)
    index = json.loads((skipped / "index.json").read_text())
    assert index["kept"] == 2 and sum(index["skipped"].values()) == 1
    result = run(["data", "prepare", "--files", str(bad), "--out", str(tmp_path / "cli"), "--no-progress",
                  "--cache-dir", str(tmp_path / "cache")], tmp_path, timeout=120)
    assert result.returncode == 2
    assert "bad.jsonl" in result.stderr and "2" in result.stderr and "text" in result.stderr, result.stderr


def test_a_folder_of_other_inputs_or_tokenizer_is_refused(tmp_path, corpus, tokenizer):
    path, _ = corpus
    out = prepare_shards([path], tokenizer, tmp_path / "out", shard_tokens=1000, workers=1, progress=False)
    with pytest.raises(ShardError, match="other inputs"):
        prepare_shards([path], tokenizer, out, shard_tokens=999, workers=1, progress=False)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not a shard folder"):
        prepare_shards([path], tokenizer, tmp_path / "stranger", workers=1, progress=False)
