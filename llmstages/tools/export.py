"""`llmstages export`: a Hugging Face folder from a training checkpoint."""

from __future__ import annotations

import argparse

HELP = "write a checkpoint as a Hugging Face model folder"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages export", description=HELP)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", help="tokenizer.json or folder to copy beside the weights")
    args = parser.parse_args(argv)
    import torch

    from llmstages.model.hf import to_hf
    from llmstages.model.transformer import Transformer
    from llmstages.stages.base import load_backbone_weights

    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    model = Transformer(checkpoint_config(checkpoint))
    load_backbone_weights(model, args.ckpt)
    ids = {}
    if args.tokenizer:
        from llmstages.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(args.tokenizer)
        # so transformers' generate stops at the end of text and pads with the real pad id
        ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    out = to_hf(model, args.out, **ids)
    if args.tokenizer:
        tokenizer.save(out)
    print(f"wrote {out}")


def checkpoint_config(checkpoint: dict):
    from llmstages.model.config import ModelConfig
    from llmstages.stages.base import resolve_config

    hp = checkpoint["hyper_parameters"]
    model = hp.get("model")
    if isinstance(model, dict):
        model = ModelConfig.from_dict(model)
    return resolve_config(model, hp.get("preset", "tiny"), hp.get("vocab_size"), hp.get("init_from"))
