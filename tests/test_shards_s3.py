"""StreamingPretrainData from `s3://` on an S3-compatible server the test starts on loopback (moto in server
mode): the same rows as the local folder, the endpoint from the usual AWS variable, and few, bounded requests."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from llmstages.data import StreamingPretrainData, synthetic
from llmstages.data.base import default_tokenizer
from llmstages.data.shards import prepare_shards

moto_server = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
s3fs = pytest.importorskip("s3fs", reason="s3fs (the `s3` extra) is not installed")


@pytest.fixture
def endpoint(monkeypatch):
    with socket.socket() as sock:  # a free port on loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    except Exception as err:  # noqa: BLE001 - any failure to start is a reason to skip, not a test failure
        pytest.skip(f"moto server could not start on 127.0.0.1:{port}: {err}")
    url = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield url
    server.stop()


def test_streams_from_a_bucket_as_from_the_folder(tmp_path, endpoint):
    cache = tmp_path / "cache"
    tokenizer = default_tokenizer(cache)
    text = tmp_path / "web.txt"
    text.write_text("\n".join(synthetic.pretrain_corpus(seed=2)[:200]) + "\n")
    local = prepare_shards([text], tokenizer, tmp_path / "web", shard_tokens=900, workers=1, progress=False)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("corpus")
    fs.put(str(local) + "/", "corpus/shards/web/", recursive=True)

    def module(source, **options):
        data = StreamingPretrainData(sources=source, seq_len=32, shuffle_buffer=8, val_fraction=0.05,
                                     cache_dir=str(cache), **options)
        data.setup("fit")
        return data

    here, there = module(str(local)), module("s3://corpus/shards/web")  # endpoint: AWS_ENDPOINT_URL
    assert len(there.train_set) == len(here.train_set) > 20
    for i in range(len(here.train_set)):
        a, b = here.train_set[i], there.train_set[i]
        assert all(torch.equal(a[k], b[k]) for k in a), i
    assert len(there.val_set) == len(here.val_set) > 0
    assert all(torch.equal(here.val_set[i]["input_ids"], there.val_set[i]["input_ids"]) for i in range(len(here.val_set)))
    remote = there.train_set.sets[0]
    itemsize = np.dtype(remote.index["dtype"]).itemsize
    assert remote.bytes_read <= len(there.train_set) * 32 * itemsize + len(there.val_set) * 32 * itemsize
    explicit = module("s3://corpus/shards/web", storage_options={"endpoint_url": endpoint})
    assert torch.equal(explicit.train_set[5]["input_ids"], here.train_set[5]["input_ids"])
