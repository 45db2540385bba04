"""`grpo-fast` / `python -m grpo_fast`: one command, several jobs.

    grpo-fast train    the GRPO trainer on its built-in task (grpo_fast.trainer)
    grpo-fast info     versions and which backends are available

Benchmarks and the GPU kernels' resource report are tooling in the repository's benchmarks/
folder, not in the installed package: `python -m benchmarks --help` from a checkout.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help). Modules are imported only when their command runs.
COMMANDS = {
    "train": ("grpo_fast.trainer", "train a policy with GRPO on the built-in task"),
    "info": ("grpo_fast.cli", "versions and available backends"),
}


def info(argv=None) -> int:
    import torch

    import grpo_fast

    print(f"grpo_fast {grpo_fast.__version__}, torch {torch.__version__}")
    print(grpo_fast.describe_backends())
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}")
            return 2
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        return info(rest)
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
