"""Generation: the KV cache changes nothing but speed; batches, sampling filters, stops, fixed steps."""

from __future__ import annotations

import pytest
import torch

from llmstages.model import ModelConfig, Transformer
from llmstages.model.generate import filter_logits, generate, generate_batch

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _model(**overrides) -> Transformer:
    # untied, wider init: a random model whose greedy continuations vary (tied tiny models repeat one token)
    model = Transformer(ModelConfig.from_name("tiny", **{"tie_embeddings": False, "init_std": 0.1, **overrides})).eval()
    with torch.no_grad():  # norms away from 1, so token choices depend on every weight
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return model


MODELS = {
    "gqa": lambda: _model(),
    "qk-norm-head-dim-llama3": lambda: _model(qk_norm=True, head_dim=24, rope_scaling=LLAMA3, rope_theta=5e5),
}
PROMPTS = [[5, 9, 33, 2, 7, 100, 3], [4, 17], [250, 251, 252, 253, 254, 8, 8, 8, 1, 2, 3], [42]]


@torch.no_grad()
def _reference(model, prompt, max_new_tokens, stop_id=None, temperature=0.0, generator=None):
    """The original uncached loop: the whole sequence through the model for every token."""
    ids = torch.tensor([prompt])
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float()
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        else:
            token = int(logits.argmax())
        if token == stop_id:
            return new, True
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return new, False


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generate_equals_the_uncached_reference_greedy_and_seeded(name):
    model = MODELS[name]()
    for prompt in PROMPTS:
        assert generate(model, prompt, 24) == _reference(model, prompt, 24)
        seeded = [torch.Generator().manual_seed(7) for _ in range(2)]
        ours = generate(model, prompt, 24, temperature=1.0, generator=seeded[0])
        assert ours == _reference(model, prompt, 24, temperature=1.0, generator=seeded[1])
    greedy = generate(model, PROMPTS[0], 24)[0]
    assert len(set(greedy)) > 3  # a non-degenerate continuation, so equality means something


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_cached_equals_uncached_and_one_by_one(name):
    model = MODELS[name]()
    cached = generate_batch(model, PROMPTS, 20)
    assert cached == generate_batch(model, PROMPTS, 20, use_cache=False)
    assert cached == [generate_batch(model, [p], 20)[0] for p in PROMPTS]
    assert cached == [_reference(model, p, 20) for p in PROMPTS]
    # sampling with top-k/top-p: the same seeded draws with and without the cache
    kwargs = dict(temperature=0.9, top_k=50, top_p=0.9)
    with_cache = generate_batch(model, PROMPTS, 20, generator=torch.Generator().manual_seed(3), **kwargs)
    without = generate_batch(model, PROMPTS, 20, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
    assert with_cache == without
    assert with_cache != cached  # sampling really sampled


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = lambda out: (out > float("-inf")).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[True, True, False, False], [False, False, True, True]]
    # top-p keeps the smallest set reaching p: 0.5 < 0.7 needs the second token, 0.8 >= 0.7 stops there
    assert kept(filter_logits(logits, top_p=0.7)) == [[True, True, False, False], [False, False, True, True]]
    assert kept(filter_logits(logits, top_p=0.5)) == [[True, False, False, False], [False, False, False, True]]
    assert kept(filter_logits(logits, top_p=0.01)) == [[True, False, False, False], [False, False, False, True]]
    assert kept(filter_logits(logits, top_p=0.96)) == [[True] * 4, [True] * 4]
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == kept(filter_logits(logits, top_p=0.6))


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = _model()
    greedy = generate_batch(model, PROMPTS, 16)
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = generate_batch(model, PROMPTS, 16, temperature=1.5, generator=torch.Generator().manual_seed(0), **kwargs)
        assert sampled == greedy


def test_sampled_tokens_stay_inside_top_k():
    model = _model()
    prompt = PROMPTS[0]
    with torch.no_grad():
        top = set(torch.topk(model(torch.tensor([prompt]))[0, -1], 3).indices.tolist())
    firsts = {generate_batch(model, [prompt], 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(s))[0][0][0]
              for s in range(40)}
    assert firsts <= top and len(firsts) > 1


def test_stop_ids_end_each_row_on_its_own():
    model = _model()
    full = generate_batch(model, PROMPTS, 12)
    stop = full[0][0][3]  # the fourth token the first row generates
    out = generate_batch(model, PROMPTS, 12, stop_ids={stop, 99999})
    for (tokens, stopped), (reference, _) in zip(out, full):
        if stop in reference:
            cut = reference.index(stop)
            assert (tokens, stopped) == (reference[:cut], True)
        else:
            assert (tokens, stopped) == (reference, False)
    first = full[0][0].index(stop)
    assert out[0] == (full[0][0][:first], True) and first <= 3
    assert generate(model, PROMPTS[0], 12, stop_id=stop) == out[0]


def _count_forwards(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_fixed_steps_always_runs_max_new_tokens_forwards():
    model = _model()
    reference = generate_batch(model, [PROMPTS[0]], 10)[0][0]
    stop = reference[1]
    assert stop != reference[0]
    calls = _count_forwards(model)
    assert generate_batch(model, [PROMPTS[0]], 10, stop_ids=[stop]) == [(reference[:1], True)]
    early = len(calls)
    calls.clear()
    fixed = generate_batch(model, [PROMPTS[0]], 10, stop_ids=[stop], fixed_steps=True)
    assert len(calls) == 10 and early == 2
    assert fixed == generate_batch(model, [PROMPTS[0]], 10, stop_ids=[stop])
    calls.clear()
    generate(model, PROMPTS[0], 10, stop_id=stop, fixed_steps=True)
    assert len(calls) == 10


def test_generate_keeps_windowing_beyond_the_context():
    """Past max_seq_len the single-prompt API keeps its original behaviour: the last max_seq_len tokens."""
    model = _model(max_seq_len=16)
    prompt = list(range(1, 13))
    out, stopped = generate(model, prompt, 10)
    ids = list(prompt)
    for token in out:
        with torch.no_grad():
            assert int(model(torch.tensor([ids[-16:]]))[0, -1].argmax()) == token
        ids.append(token)
    assert len(out) == 10 and not stopped
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        generate_batch(model, [prompt], 10)


def test_on_token_streams_every_kept_token():
    model = _model()
    seen: list[tuple[int, int]] = []
    out = generate_batch(model, PROMPTS[:2], 6, on_token=lambda row, token: seen.append((row, token)))
    assert sorted(seen) == sorted((row, t) for row, (tokens, _) in enumerate(out) for t in tokens)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts": [[1], []]}, "prompt 1 is empty"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_generation_options_are_errors(kwargs, message):
    args = {"prompts": [[1, 2]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_batch(_model(), **args)


# ---------------------------------------------------------------- the generate and chat commands


def _entry_point() -> str:
    import shutil
    import sys
    from pathlib import Path

    local = Path(sys.executable).with_name("llmstages")
    found = str(local) if local.exists() else shutil.which("llmstages")
    if found is None:
        pytest.skip("the llmstages console entry point is not installed")
    return found


def _run(args: list[str], stdin: str | None = None):
    import subprocess

    result = subprocess.run([_entry_point(), *args], input=stdin, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A small random model with a trained tokenizer, as an HF folder and as a checkpoint."""
    from llmstages.data.tokenizer import Tokenizer
    from llmstages.model.hf import to_hf

    root = tmp_path_factory.mktemp("chat")
    texts = ["hello there, how are you today?", "the quick brown fox jumps over the lazy dog"] * 30
    tokenizer = Tokenizer.train(texts, vocab_size=320, show_progress=False)
    model = _model(vocab_size=tokenizer.vocab_size)
    folder = to_hf(model, root / "hf", tokenizer=tokenizer)
    ckpt = root / "model.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.config.to_dict()}}, ckpt)
    return model, tokenizer, folder, ckpt


def _expected(model, tokenizer, messages, max_new_tokens: int) -> tuple[str, bool]:
    from llmstages.data.chat import ChatTemplate

    chatml = ChatTemplate.get("chatml")
    stops = {chatml.stop_token_id(tokenizer), tokenizer.eos_id}
    [(new, stopped)] = generate_batch(model, [chatml.encode_prompt(messages, tokenizer)], max_new_tokens,
                                      stop_ids=stops)
    return tokenizer.decode(new, skip_special_tokens=True), stopped


def test_generate_command_from_hf_folder_and_checkpoint(chat_model, tmp_path, capsys):
    import json

    from llmstages.cli import main

    model, tokenizer, folder, ckpt = chat_model
    out = _run(["generate", "--model", str(folder), "--prompt", "hello there", "--prompt", "the fox?",
                "--max-new-tokens", "7", "--jsonl"])
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "the fox?"]
    for row in rows:
        reply, stopped = _expected(model, tokenizer, [{"role": "user", "content": row["prompt"]}], 7)
        assert (row["reply"], row["stopped"]) == (reply, stopped)
        assert row["new_tokens"] <= 7
    # a .ckpt with a tokenizer and a JSONL prompts file with messages
    prompts = tmp_path / "prompts.jsonl"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you"}]
    prompts.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "hello"}) + "\n")
    capsys.readouterr()
    main(["generate", "--ckpt", str(ckpt), "--tokenizer", str(folder), "--prompts", str(prompts),
          "--max-new-tokens", "5", "--jsonl", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["prompt"] == messages and all(r["new_tokens"] <= 5 for r in rows)


def test_chat_command_streams_multi_turn_and_resets(chat_model):
    model, tokenizer, folder, _ = chat_model
    out = _run(["chat", "--model", str(folder), "--max-new-tokens", "6"],
               stdin="hello there\nhow are you\n/reset\nhello there\n/exit\nnever read\n")
    replies = [line.removeprefix("assistant> ") for line in out.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 3 and "[conversation reset]" in out
    first, _ = _expected(model, tokenizer, [{"role": "user", "content": "hello there"}], 6)
    second, _ = _expected(model, tokenizer, [{"role": "user", "content": "hello there"},
                                             {"role": "assistant", "content": first},
                                             {"role": "user", "content": "how are you"}], 6)
    assert replies == [first, second, first]  # the second turn saw the first; /reset forgot it


def test_generate_command_errors_are_clear(chat_model, tmp_path, capsys):
    from llmstages.cli import main

    _, _, folder, _ = chat_model
    with pytest.raises(SystemExit) as missing:
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert missing.value.code == 2 and "no such checkpoint file or Hugging Face folder" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "--prompts", str(tmp_path / "bad.jsonl")])
    assert "bad.jsonl:1: expected an object with 'messages'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "--prompt", "x", "--max-new-tokens", "600"])
    assert "exceeds max_seq_len=512" in capsys.readouterr().err


def test_generate_command_text_file_and_raw_continuation(chat_model, tmp_path, capsys):
    import json

    from llmstages.cli import main

    model, tokenizer, folder, _ = chat_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nthe quick brown\n")  # blank lines are skipped
    main(["generate", "--model", str(folder), "--prompts", str(prompts), "--raw", "--max-new-tokens", "4",
          "--jsonl", "--batch-size", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "the quick brown"]
    for row in rows:
        [(new, stopped)] = generate_batch(model, [tokenizer.encode(row["prompt"])], 4, stop_ids={tokenizer.eos_id})
        assert (row["reply"], row["stopped"]) == (tokenizer.decode(new, skip_special_tokens=True), stopped)


def test_evaluate_replies_batches_give_the_one_by_one_replies():
    """Scoring in batches (and a prompt too long for one window, alone) changes nothing but speed."""
    from types import SimpleNamespace

    from llmstages.evaluation import evaluate_replies

    model = _model(max_seq_len=16)
    long_prompt = list(range(3, 15))  # 12 tokens + 6 new > 16: slides the window
    prompts = [*PROMPTS[:2], long_prompt, PROMPTS[3], PROMPTS[0]]
    stop_id = generate(model, PROMPTS[0], 3)[0][1]  # a token this model does emit: some replies stop
    decode = SimpleNamespace(decode=lambda ids, **_: " ".join(map(str, ids)), encode=lambda text: [0])
    one_by_one = [generate(model, p, 6, stop_id=stop_id) for p in prompts]
    replies = [" ".join(map(str, new)) for new, _ in one_by_one]
    stops = [stopped for _, stopped in one_by_one]
    assert 0 < sum(stops) < len(prompts)
    references = [*replies[:1], "not this", *replies[2:]]
    for batch_size in (1, 2, 64):
        quality = evaluate_replies(model, prompts, references, stop_id, decode, max_new_tokens=6, batch_size=batch_size)
        assert [s["reply"] for s in quality["samples"]] == replies
        assert [s["stopped"] for s in quality["samples"]] == stops
        assert quality["stop_rate"] == sum(stops) / len(prompts)
        assert quality["exact_match"] == sum(stop for i, stop in enumerate(stops) if i != 1) / len(prompts)
        assert [s["exact_match"] for s in quality["samples"]] == [stop and i != 1 for i, stop in enumerate(stops)]


def test_greedy_replies_fixed_steps_runs_the_same_forwards_whichever_prompts_fit():
    """Under FSDP every rank scores its own prompts with `fixed_steps`; the forward count must not depend on
    how many of them fit one window (GRPO's validation budget may exceed max_completion_length), or ranks hang."""
    from llmstages.evaluation import greedy_replies

    model = _model(max_seq_len=16)
    long_prompt = list(range(3, 15))  # 12 tokens + 6 new > 16: answered alone, sliding
    ranks = [[PROMPTS[0], PROMPTS[1], PROMPTS[3]], [PROMPTS[0], long_prompt, PROMPTS[3]]]
    counts = []
    for prompts in ranks:
        calls = []
        hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
        replies = greedy_replies(model, prompts, stop_id=-1, max_new_tokens=6, fixed_steps=True)
        hook.remove()
        counts.append(len(calls))
        assert replies == [generate(model, p, 6, stop_id=-1) for p in prompts]
    assert counts[0] == counts[1]
