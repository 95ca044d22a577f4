"""Token shards: a corpus tokenised once (`prepare`), then streamed for pretraining (`streaming`).

Design choices (docs/design.md, "Streamed pretraining"):
- A plain format we own: `shard-NNNNN.bin` files of uint16/uint32 token ids (EOS after every
  document, as `PretrainData`'s cache), a fixed number of tokens per shard (the last shorter),
  and `index.json` (token and document counts per shard, tokenizer fingerprint, the inputs' key).
  Read by byte ranges through fsspec: a local folder or `s3://bucket/prefix` alike.
- Every row a rank trains on is a pure function of its stream position (`order`), so the
  resume state is one integer per rank, which the existing step loader already saves in
  Lightning's checkpoint; the shuffle window, each source's cursor and the packing
  remainder are recomputed from it, never stored.
"""

from llmstages.data.shards.index import ShardError, tokenizer_fingerprint
from llmstages.data.shards.prepare import prepare_shards

__all__ = ["ShardError", "prepare_shards", "tokenizer_fingerprint"]
