"""`python -m internlm_fast.train [CONFIG.py] [--key=value ...]`

With no arguments: trains the tiny preset on the built-in corpus (the Python standard library's own
sources, tokenized on first use), validates, checkpoints and prints a sample. `--help` lists every
config key with its default. `--resume auto` (or `--ckpt.resume=auto`) continues from the newest
intact checkpoint.

Data-parallel on several processes, machines or GPUs: launch the same command with torchrun, e.g.
`torchrun --nproc_per_node=4 -m internlm_fast.train CONFIG.py` (see the README).
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError, format_config_help, load_config

_ALIASES = {"--resume": "--ckpt.resume"}


def _split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(config file, ['key=value', ...]); accepts --key=value and --key value."""
    path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            key = _ALIASES.get(key, key)
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"{arg} needs a value: write {arg}=VALUE")
                value = argv[i + 1]
                i += 1
            overrides.append(f"{key[2:]}={value}")
        elif "=" in arg:
            overrides.append(arg)
        elif path is None:
            path = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: give one config file and --key=value overrides")
        i += 1
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(format_config_help())
        return 0
    try:
        path, overrides = _split_args(argv)
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from . import distributed
    from .trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    except distributed.DistributedError as e:
        # the group is broken: tearing it down could wait on the dead peer, so leave at once
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    distributed.shutdown(trainer.dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
