"""`python -m internlm_fast.data {tokenize,train-tokenizer,prepare-builtin}`: data preparation commands.

Exit status 2 on bad input (a malformed line, a missing file), with a message naming it.
"""

from __future__ import annotations

import argparse
import sys

from .builtin_corpus import prepare_builtin_corpus
from .documents import TXT_MODES
from .tokenize_corpus import tokenize_files
from .tokenizer_trainer import train_tokenizer

INPUT_HELP = (
    ".txt and .jsonl files. By default a .txt file is one document (see --txt-mode); a .jsonl file has one JSON "
    'object per line: {"text": ...} for pretraining or {"messages": [{"role": ..., "content": ...}, ...]} for SFT '
    "(roles system, user, assistant)"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m internlm_fast.data", description="Prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser(
        "tokenize",
        help="tokenize text into memory-mapped token files (PREFIX.bin, PREFIX.idx, PREFIX.mask for SFT)",
        description="Tokenize .txt/.jsonl files into PREFIX.bin + PREFIX.idx (+ PREFIX.mask, the loss mask, for "
        "SFT data). Pretraining documents become <s> text </s>; SFT conversations use the InternLM chat "
        "template. Pretraining and SFT lines cannot be mixed in one output.",
    )
    tok.add_argument("--tokenizer", required=True, help="sentencepiece model (ours or InternLM's tokenizer.model)")
    tok.add_argument("--input", required=True, nargs="+", help=INPUT_HELP)
    tok.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx (PREFIX.mask)")
    tok.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    tok.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines instead of failing")
    tok.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="file",
        help="how a .txt file is split into documents: the whole file is one document (default), each "
        "non-blank line is one, or each blank-line separated paragraph is one",
    )
    tok.add_argument("--no-progress", action="store_true", help="no progress bar")

    tr = sub.add_parser("train-tokenizer", help="train a sentencepiece BPE tokenizer with <eoh>/<eoa> tokens")
    tr.add_argument("--input", required=True, nargs="+", help=INPUT_HELP)
    tr.add_argument("--output", required=True, help="the model file to write, e.g. tokenizer.model")
    tr.add_argument("--vocab-size", type=int, default=8192)
    tr.add_argument("--txt-mode", choices=TXT_MODES, default="file", help="as for tokenize")

    bi = sub.add_parser("prepare-builtin", help="prepare (or find in the cache) the built-in Python-stdlib corpus")
    bi.add_argument("--cache-dir", default=None, help="default: $INTERNLM_FAST_CACHE or ~/.cache/internlm_fast")
    bi.add_argument("--vocab-size", type=int, default=8192)

    args = parser.parse_args(argv)
    try:
        if args.command == "tokenize":
            if args.workers is not None and args.workers < 1:
                parser.error(f"--workers must be at least 1, got {args.workers}")
            stats = tokenize_files(
                args.tokenizer,
                args.input,
                args.output,
                workers=args.workers,
                skip_bad_lines=args.skip_bad_lines,
                progress=not args.no_progress,
                txt_mode=args.txt_mode,
            )
            for msg in stats.bad_line_messages:
                print(f"skipped {msg}", file=sys.stderr)
            print(stats.summary(), file=sys.stderr)
        elif args.command == "train-tokenizer":
            path = train_tokenizer(args.input, args.output, args.vocab_size, txt_mode=args.txt_mode)
            print(f"wrote {path}", file=sys.stderr)
        else:
            corpus = prepare_builtin_corpus(args.cache_dir, args.vocab_size)
            print(f"tokenizer: {corpus.tokenizer_path}\ntrain: {corpus.train_prefix}\nval: {corpus.val_prefix}")
            print(f"unigram entropy: {corpus.unigram_entropy:.4f} nats")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
