"""`llmstages import --hf DIR --out CKPT`: a Hugging Face folder as a checkpoint `init_from` reads.

Design choice: the file is the minimal Lightning-checkpoint layout our
stages read, `{"state_dict": {"backbone.<name>": tensor}, "hyper_parameters":
{"model": ModelConfig.to_dict()}}`, so `init_from: model.ckpt` and
`llmstages export` rebuild the exact shape without the original folder.
It is written to a temporary file and renamed, so a kill never leaves a
truncated checkpoint. The weights stay float32 unless `--dtype` says otherwise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from llmstages.tools import TOOLS

HELP = TOOLS["import"].help

DTYPES = ("float32", "bfloat16", "float16")


def import_hf(folder: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    import torch

    from llmstages.model.hf import from_hf

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = from_hf(folder, dtype=getattr(torch, dtype))
    checkpoint = {
        "state_dict": {f"backbone.{name}": t for name, t in model.state_dict().items()},
        "hyper_parameters": {"model": model.config.to_dict(), "imported_from": str(Path(folder).resolve())},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages import", description=HELP)
    parser.add_argument("--hf", required=True, help="a local Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="the .ckpt file to write")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    args = parser.parse_args(argv)
    from llmstages.errors import as_user_error

    with as_user_error(ValueError, FileNotFoundError):
        out = import_hf(args.hf, args.out, args.dtype)
    print(f"wrote {out}")
