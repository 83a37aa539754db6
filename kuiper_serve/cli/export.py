"""`kuiper export MODEL OUT --quant int8|none [--group-size 64|128]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from inference_service.models.ancestor import ARCHES
from inference_service.quant.export import QUANT_CHOICES, export_model
from inference_service.quant.int8 import GROUP_SIZES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as int8 (or bf16) safetensors + config + tokenizer",
        description="Write MODEL (HF folder, GGUF file, or a KuiperLLama .bin export) to the "
        "folder OUT: with --quant int8 every linear layer and the embedding as symmetric "
        "per-group int8 with fp16 scales (norms stay fp32); with --quant none as bf16. "
        "`kuiper up --model OUT` serves the result.",
    )
    p.add_argument("model", metavar="MODEL", help="HF folder, GGUF file or KuiperLLama .bin")
    p.add_argument("out", metavar="OUT", help="output folder (created; must be empty)")
    p.add_argument("--quant", default="int8", choices=QUANT_CHOICES, help="default: int8")
    p.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES,
                   help="int8: inputs per scale (default 64)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json / tokenizer.model / folder to ship with OUT "
                   "(default: MODEL's own; required for a .bin, which holds none)")  # fmt: skip
    p.add_argument("--kuiper-arch", default=None, choices=sorted(ARCHES),
                   help="model family of a KuiperLLama .bin (its file does not say; default: "
                   "qwen2 if it holds q/k/v biases, else llama2)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)


def write_gguf_tokenizer(gguf: Path, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json from a GGUF's vocabulary, as the tokenizer
    service rebuilds it (special tokens and chat template included)."""
    from tokenizer_service.gguf_vocab import build_tokenizer, read_gguf_vocab
    from tokenizer_service.tokenizer import load_tokenizer

    build_tokenizer(read_gguf_vocab(gguf)).save(str(out / "tokenizer.json"))
    tok = load_tokenizer(gguf)
    roles = (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id), ("unk", tok.unk_id))
    cfg: dict[str, str] = {f"{r}_token": tok.id_to_token(i) for r, i in roles if i is not None}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def cmd_export(args: argparse.Namespace) -> int:
    from inference_service.models.config import ModelLoadError

    try:
        s = export_model(
            args.model,
            args.out,
            args.quant,
            args.group_size,
            tokenizer=args.tokenizer,
            ancestor_arch=args.kuiper_arch,
            gguf_tokenizer=write_gguf_tokenizer,
            progress=not args.quiet,
        )
    except (ModelLoadError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"kuiper export: {exc}", file=sys.stderr)
        return 1
    group = f", group {s.group_size}" if s.group_size else ""
    print(f"wrote {s.out} ({s.quant}{group}): {s.tensors} tensors, "
          f"{s.written_bytes / 2**20:.1f} MiB (float32: {s.source_bytes / 2**20:.1f} MiB, "
          f"{s.written_bytes / s.source_bytes:.1%})")  # fmt: skip
    return 0
