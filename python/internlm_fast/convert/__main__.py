"""`python -m internlm_fast.convert COMMAND SRC DST [options]`

  to-hf SRC DST          our trainer checkpoint (runs/<job>/checkpoints/step-N, or runs/<job> for its
                         newest one) or model folder -> a Hugging Face folder (LlamaForCausalLM) that
                         stock transformers loads offline, tokenizer included
  from-hf SRC DST        a Hugging Face LLaMA or InternLM (model_type internlm) folder, .bin or
                         .safetensors, sharded or not -> our model folder (for chat and for training
                         with --model.init_from)
  from-internlm SRC DST  an InternLM training checkpoint (model_tp0_pp*.pt) -> our model folder;
                         needs model_config.pt in SRC or --config

Our model folder is the same Hugging Face layout, so the output of every command loads with
InternLMForCausalLM.from_pretrained and with transformers' AutoModelForCausalLM. With --quantize int8
every command writes an int8 folder instead (int8 linear weights with fp32 scales, the format in
README.md), which from_pretrained, chat and serve load without the float weights; transformers does
not read it. DST is written into a temporary folder and renamed when complete; an existing non-empty
DST is kept unless --force.
"""

from __future__ import annotations

import argparse
import sys

from internlm_fast.model.hf_config import dtype_from_name
from internlm_fast.model.pretrained import DEFAULT_MAX_SHARD_SIZE

from .convert import convert, parse_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m internlm_fast.convert", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("to-hf", "our checkpoint or model folder -> Hugging Face folder"),
        ("from-hf", "Hugging Face LLaMA / InternLM folder -> our model folder"),
        ("from-internlm", "InternLM training checkpoint -> our model folder"),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("src", help="source folder")
        p.add_argument("dst", help="destination folder (created; must be empty or absent unless --force)")
        p.add_argument("--tokenizer", help="sentencepiece .model (or folder with tokenizer.model) to include")
        p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast the weights (default: as stored)")
        p.add_argument(
            "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="shard the weights past this size (5GB, 500MB)"
        )
        p.add_argument(
            "--quantize",
            choices=("int8",),
            default=None,
            help="write an int8 folder (weight-only int8, fp32 scales per 64 inputs; after --dtype's cast)",
        )
        p.add_argument("--force", action="store_true", help="replace a non-empty destination")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "from-internlm":
            p.add_argument("--config", help="model config: a preset name (internlm-7b, ...) or a config.json")
            p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = parse_config(getattr(args, "config", None), getattr(args, "set", []))
        convert(
            args.src,
            args.dst,
            tokenizer=args.tokenizer,
            config=config,
            dtype=dtype_from_name(args.dtype),
            max_shard_size=args.max_shard_size,
            force=args.force,
            progress=not args.no_progress,
            quantize=args.quantize,
        )
    except (ValueError, KeyError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
