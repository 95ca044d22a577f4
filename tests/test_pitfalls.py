"""Regression tests for the rows of PITFALLS.md that no other test pinned convincingly.

Each test's docstring names the published bug it pins. Every test here was
checked against a deliberately broken copy of the code (the bug reintroduced)
and fails there; several of those breaks pass every other test file.

Design choices:
- Real components only: the minimind `tokenizer.json` (ChatML markers, its
  `<|endoftext|>` doubling as pad and unk), the embedded synthetic data, the
  real alpaca file, real Lightning fits on the `tiny` preset.
- References are computed independently of the code under test: full logits
  with a textbook `logits[:, :-1]` / `labels[:, 1:]` shift, conversation
  counts from the generator, a scripted clock.
- The whole file runs in a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import typing
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import tokenizers
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from tokenizers import processors
from torch import nn

from helpers import labelled_runs
from llmstages import callbacks as callbacks_mod
from llmstages.callbacks import ThroughputMonitor
from llmstages.data import synthetic
from llmstages.data import PreferenceData, PretrainData, SFTData
from llmstages.data.chat import ChatTemplate
from llmstages.losses import IGNORE_INDEX
from llmstages.data.tokenizer import Tokenizer
from llmstages.losses import count_targets
from llmstages.model.config import ModelConfig
from llmstages.stages import DPOModule, PretrainModule, RewardModule, SFTModule
from llmstages.stages.base import StageModule

X = IGNORE_INDEX
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec"),
]


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def minimind(shared_data: Path) -> str:
    return str(shared_data / "minimind")



def sharpen(module: nn.Module, std: float = 0.15) -> None:
    """Larger random weights: near-uniform init logits would hide a misaligned target."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def textbook_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[B, T]`: log p(labels[t + 1] | logits[t]) via the classic `[:, :-1]` / `[:, 1:]` slicing, 0 elsewhere."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    picked = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    out = torch.zeros(labels.shape, dtype=picked.dtype)
    out[:, :-1] = torch.where(target != X, picked, 0.0)
    return out


def is_plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


# --------------------------------------------------------------------------- OpenRLHF #973


def test_stages_score_every_reply_from_the_position_before_it(minimind: str, cache: Path) -> None:
    """OpenRLHF #973: a second shift (`loss_mask[:, :-1]` on top of the label shift) left every
    reply's first token untrained. The SFT loss and the DPO sequence log-probs must equal the
    textbook single shift on full logits, so a shift added in any stage fails here (the template
    tests only see labels, and the training tests still learn with a double shift)."""
    data = SFTData(tokenizer=minimind, packing="none", seq_len=128, cache_dir=str(cache), shuffle=False)
    data.setup("fit")
    stop = data.stop_token_id
    multi = [e for e in data.train_set if len(labelled_runs(e["labels"])) > 1][:3]
    single = [e for e in data.train_set if len(labelled_runs(e["labels"])) == 1][:3]
    batch = data.collate(multi + single)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]

    module = SFTModule(model=ModelConfig.from_name("tiny", vocab_size=data.vocab_size, n_layer=1), generate_samples=0)
    sharpen(module)
    with torch.no_grad():
        expected = textbook_logps(module.backbone(ids, position_ids=pos), labels)
        got = module.target_logps(ids, labels, pos)
        loss, _, _ = module.compute_loss(batch)
    assert torch.equal(got != 0, expected != 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, -expected.sum() / count_targets(labels), rtol=1e-5, atol=1e-6)
    for row in range(len(ids)):
        for a, b in labelled_runs(labels[row].tolist()):
            assert got[row, a - 1] != 0, "first reply token not scored"
            assert int(ids[row, b - 1]) == stop and got[row, b - 2] != 0, "end-of-turn not scored"

    pref = PreferenceData(tokenizer=minimind, seq_len=128, cache_dir=str(cache), shuffle=False)
    pref.setup("fit")
    pbatch = pref.collate([pref.train_set[i] for i in range(4)])
    dpo = DPOModule(model=ModelConfig.from_name("tiny", vocab_size=pref.vocab_size, n_layer=1))
    sharpen(dpo)
    with torch.no_grad():
        chosen, rejected, _ = dpo.pair_logps(pbatch)
        for side, seq in (("chosen", chosen), ("rejected", rejected)):
            logits = dpo.backbone(pbatch[f"{side}_input_ids"], position_ids=pbatch[f"{side}_position_ids"])
            reference = textbook_logps(logits, pbatch[f"{side}_labels"]).sum(1)
            torch.testing.assert_close(seq, reference, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- TRL #1623, LLaMA-Factory #8263


@pytest.mark.parametrize("packing", ["none", "documents"])
def test_sft_batches_label_every_end_of_turn_and_pad_is_its_own_id(minimind: str, cache: Path, packing: str) -> None:
    """TRL #1623 / #2059 (pad id == EOS and the collator masks every pad, the real EOS included) and
    LLaMA-Factory #8263 (multi-turn end-of-turn tokens lost to "efficient EOS"). In real batches
    from `SFTData` with the minimind tokenizer (whose own pad is `<|endoftext|>`), in both
    layouts: pad has its own id, padding is never labelled, every labelled run ends with a
    labelled end-of-turn token and nothing after it is labelled, and the labelled end-of-turn
    tokens of the whole data set number exactly the assistant turns of the conversations."""
    data = SFTData(tokenizer=minimind, packing=packing, seq_len=256, batch_size=64, cache_dir=str(cache))
    data.setup("fit")
    tok, stop = data.tokenizer, data.stop_token_id
    assert data.truncated == 0 and not data.skipped  # so every reply is whole
    assert stop == tok.eos_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_id not in {tok.eos_id, stop, tok.token_to_id("<|endoftext|>")}
    sep = tok.encode("\n")

    labelled_stops = 0
    for loader in (data.train_dataloader(), data.val_dataloader()):
        for batch in loader:
            ids, labels = batch["input_ids"], batch["labels"]
            padding = ids == tok.pad_id
            if packing == "documents":
                assert torch.equal(padding, batch["document_ids"] == -1)
            assert bool((labels[padding] == X).all())
            for row in range(len(ids)):
                row_ids, row_labels = ids[row].tolist(), labels[row].tolist()
                for a, b in labelled_runs(row_labels):
                    assert row_ids[b - 1] == stop and stop not in row_ids[a : b - 1]
                    assert row_ids[b : b + len(sep)] == sep and set(row_labels[b : b + len(sep)]) == {X}
            labelled_stops += int((labels == stop).sum())
    replies = sum(m["role"] == "assistant" for c in synthetic.sft_conversations(seed=0) for m in c["messages"])
    multi_turn = sum(sum(m["role"] == "assistant" for m in c["messages"]) > 1 for c in synthetic.sft_conversations(seed=0))
    assert multi_turn > 100
    assert labelled_stops == replies


# --------------------------------------------------------------------------- LLaMA-Factory #5165


@pytest.mark.parametrize("packing", ["none", "documents"])
def test_validation_rows_are_the_training_encode_of_their_conversations(minimind: str, cache: Path, packing: str) -> None:
    """LLaMA-Factory #5165: validation examples went through another encode than training, so
    train and eval masks differed. With a non-default mask and truncation, each validation
    conversation re-encoded by the module's own `encode` gives exactly its validation row (as a
    packed document: the same, its first label aside), and the generation prompts used for the
    stop rate are the prefix of those rows that carries no label."""
    data = SFTData(
        tokenizer=minimind, packing=packing, loss_mask="last_assistant", truncation="left",
        seq_len=40, val_fraction=0.1, cache_dir=str(cache),
    )
    data.setup("fit")
    tok, template = data.tokenizer, data.template
    conversations = data.val_conversations
    expected = [data.encode(m) for m in conversations]
    assert len(expected) == 200 and all(e is not None for e in expected)
    full = [template.encode(m, tok, "last_assistant") for m in conversations]
    assert sum(len(f["input_ids"]) > 40 for f in full) > 10  # truncation is exercised
    # negative control: the default mask gives other labels on multi-turn conversations
    assert sum(template.encode(m, tok)["labels"] != f["labels"] for m, f in zip(conversations, full)) > 10

    if packing == "none":
        assert [(e["input_ids"], e["labels"]) for e in data.val_set] == [(e["input_ids"], e["labels"]) for e in expected]
        batch = next(iter(data.val_dataloader()))
        for row, e in enumerate(expected[: len(batch["labels"])]):
            n = len(e["labels"])
            assert batch["labels"][row, :n].tolist() == e["labels"] and bool((batch["labels"][row, n:] == X).all())
    else:
        documents = Counter()
        for row in data.val_set:
            for d in row["document_ids"].unique().tolist():
                if d >= 0:
                    where = row["document_ids"] == d
                    documents[(tuple(row["input_ids"][where].tolist()), tuple(row["labels"][where].tolist()))] += 1
        assert documents == Counter((tuple(e["input_ids"]), (X, *e["labels"][1:])) for e in expected)

    prompts = data.generation_prompts(len(conversations))
    assert len(prompts) == len(conversations)
    checked = 0
    for (prompt, reference), e, f, m in zip(prompts, expected, full, conversations):
        assert reference == m[-1]["content"]
        if len(f["input_ids"]) <= 40:  # untruncated: the prompt is exactly the unlabelled prefix
            first = next(i for i, t in enumerate(e["labels"]) if t != X)
            assert e["input_ids"][: len(prompt)] == prompt and first == len(prompt)
            checked += 1
    assert checked > 100


# --------------------------------------------------------------------------- TRL #1191, #4879


def test_every_dropped_example_is_counted_with_its_reason(minimind: str, cache: Path, shared_data: Path) -> None:
    """TRL #1191 (the completion collator silently dropped a whole data set) and TRL #4879 (masks
    silently all zeros). On the real alpaca file every record is either kept or counted under a
    reason; a data set with nothing left is an error naming why; a conversation without target
    tokens is counted as `no_targets` (skip) or raised (strict), never kept with an empty mask."""
    file = str(shared_data / "llamafactory" / "alpaca_en_demo.json")
    records = len(json.loads(Path(file).read_text(encoding="utf-8")))
    for truncation in ("right", "drop"):
        data = SFTData(files=[file], tokenizer=minimind, seq_len=128, truncation=truncation, packing="none", cache_dir=str(cache))
        data.setup("fit")
        dropped = sum(data.skipped.values())
        assert dropped > 0 and set(data.skipped) == {"reply_truncated_away" if truncation == "right" else "too_long_dropped"}
        assert len(data.train_set) + len(data.val_set) + dropped == records
        assert all(count_targets(torch.tensor([e["labels"]])) > 0 for e in [*data.train_set, *data.val_set])
    nothing_left = SFTData(files=[file], tokenizer=minimind, seq_len=8, truncation="drop", cache_dir=str(cache))
    with pytest.raises(ValueError, match=rf"no usable examples left \(too_long_dropped: {records}\)"):
        nothing_left.setup("fit")

    no_reply = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    lenient = SFTData(tokenizer=minimind, on_error="skip", cache_dir=str(cache))
    assert lenient.encode(no_reply) is None and lenient.skipped == Counter({"no_targets": 1})
    with pytest.raises(ValueError, match="no target tokens"):
        SFTData(tokenizer=minimind, cache_dir=str(cache)).encode(no_reply)


# --------------------------------------------------------------------------- TRL #6105


def test_a_post_processor_never_shifts_the_reply_mask(minimind: str, shared_data: Path, tmp_path: Path) -> None:
    """TRL #6105: a tokenizer that starts adding special tokens on encode shifts the prompt length
    and the mask by that many tokens. Many Hugging Face `tokenizer.json` files add BOS/EOS through
    a post-processor (Llama's does); loaded here, it must change nothing: segment ids equal the
    plain tokenizer's and every labelled run still decodes to exactly its reply."""
    raw = tokenizers.Tokenizer.from_file(str(Path(minimind) / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|endoftext|>", special_tokens=[("<|im_start|>", 1), ("<|endoftext|>", 0)]
    )
    assert raw.encode("Hello world").ids[0] == 1  # the file really adds tokens by default
    raw.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(Path(minimind) / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with_bos, plain = Tokenizer.from_file(tmp_path), Tokenizer.from_file(minimind)

    pairs = json.loads((shared_data / "llamafactory" / "dpo_en_demo.json").read_text(encoding="utf-8"))
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    template = ChatTemplate.get("chatml")
    checked = 0
    for pair in pairs[:40]:
        messages = [{"role": role[t["from"]], "content": t["value"]} for t in [*pair["conversations"], pair["chosen"]]]
        out = template.encode(messages, with_bos)
        assert out == template.encode(messages, plain)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        spans = labelled_runs(out["labels"])
        assert len(spans) == len(replies)
        for (a, b), reply in zip(spans, replies):
            assert with_bos.decode(out["input_ids"][a:b], skip_special_tokens=True) == reply
            assert out["input_ids"][b - 1] == template.stop_token_id(with_bos)
        checked += len(replies) > 1
    assert checked > 0  # multi-turn conversations included


# --------------------------------------------------------------------------- torchtune #1875, LitGPT


def test_throughput_divides_counted_tokens_by_measured_batch_time(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchtune PR #1875 note / LitGPT `pretrain.py`: tokens/s that counts padding as trained, or
    divides by a timestamp instead of a duration. A scripted clock (large absolute values, 100 s
    gaps between batches, batches of 0.25, 0.5 and 0.75 s) makes both rates exact: all tokens
    and labelled target tokens, each over the 1.5 s the batches took."""
    ticks = iter([1e6, 1e6 + 0.25, 1e6 + 100, 1e6 + 100.5, 1e6 + 200, 1e6 + 200.75])
    monkeypatch.setattr(callbacks_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))

    seen: list[tuple[int, int]] = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append((batch["input_ids"].numel(), count_targets(batch["labels"])))

    data = SFTData(cache_dir=str(cache), batch_size=4, seq_len=128, packing="none")
    model = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    monitor = ThroughputMonitor(window=3)
    L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[monitor, Count()],
    ).fit(model, data)
    total, labelled = sum(t for t, _ in seen), sum(n for _, n in seen)
    assert len(seen) == 3 and labelled < total  # padding and prompts are in the batch
    assert monitor.last_metrics["perf/tokens_per_sec"] == pytest.approx(total / 1.5)
    assert monitor.last_metrics["perf/labelled_tokens_per_sec"] == pytest.approx(labelled / 1.5)


# --------------------------------------------------------------------------- Lightning #19906


def _module_hints(cls: type) -> dict[str, object]:
    hints: dict[str, object] = {}
    for klass in cls.__mro__:
        if isinstance(klass, type) and issubclass(klass, StageModule):
            hints.update(typing.get_type_hints(klass.__init__))
    return hints


def _mentions_module(hint: object) -> bool:
    if isinstance(hint, type) and issubclass(hint, nn.Module):
        return True
    return any(_mentions_module(arg) for arg in typing.get_args(hint))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo"])
def test_every_stage_checkpoint_rebuilds_from_plain_hyperparameters(cache: Path, tmp_path: Path, stage: str) -> None:
    """Lightning #19906: `nn.Module` objects passed as hyper-parameters make checkpoints that cannot
    rebuild the model. For every stage (not only SFT): no constructor argument is typed as a
    module, the saved hyper-parameters are plain data that `torch.load(weights_only=True)`
    accepts, and `load_from_checkpoint` with nothing passed in rebuilds the same outputs."""
    cls = {"pretrain": PretrainModule, "sft": SFTModule, "reward": RewardModule, "dpo": DPOModule}[stage]
    assert not [name for name, hint in _module_hints(cls).items() if _mentions_module(hint)]

    common = dict(cache_dir=str(cache), batch_size=4, shuffle=False)
    data = {
        "pretrain": lambda: PretrainData(seq_len=64, **common),
        "sft": lambda: SFTData(seq_len=128, packing="none", **common),
        "reward": lambda: PreferenceData(seq_len=128, **common),
        "dpo": lambda: PreferenceData(seq_len=128, **common),
    }[stage]()
    extra = {"generate_samples": 0} if stage == "sft" else {}
    config = ModelConfig.from_name("tiny", vocab_size=data.vocab_size, n_layer=1)
    module = cls(model=config, lr=1e-2, **extra)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    path = tmp_path / f"{stage}.ckpt"
    trainer.save_checkpoint(path)

    saved = torch.load(path, weights_only=True)["hyper_parameters"]
    assert is_plain(dict(saved)), saved
    loaded = cls.load_from_checkpoint(path)
    assert loaded.config == module.config and loaded.hparams.lr == 1e-2
    assert loaded.state_dict().keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    data.setup("fit")
    batch = data.collate([data.train_set[i] for i in range(2)])
    ids = batch.get("input_ids", batch.get("chosen_input_ids"))
    module.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(ids), module.backbone(ids), rtol=0, atol=0)


# --------------------------------------------------------------------------- Lightning #21812


def test_shipped_fsdp_fragment_builds_a_cpu_trainer() -> None:
    """Lightning #21812: `FSDPStrategy` refuses the CPU. The shipped `fsdp.yaml` fragment must
    give a strategy that a CPU trainer accepts (FSDP2 through `ModelParallelStrategy`, which the
    stages' `configure_model` shards with); `FSDPStrategy` on CPU is the negative control."""
    spec = yaml.safe_load((CONFIGS / "fragments" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    module_name, _, class_name = spec["class_path"].rpartition(".")
    strategy_cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy_cls(**spec.get("init_args", {})), logger=False)
    assert isinstance(trainer.strategy, ModelParallelStrategy)
    with pytest.raises(ValueError, match="requires a GPU"):
        L.Trainer(accelerator="cpu", devices=1, strategy=FSDPStrategy(), logger=False)
