"""The ``pdserve`` command line: one parser, its subcommands assembled from one module per group.

- ``pdserve.offline``: make-model, generate
- ``pdserve.serve``: prefill, decode, gateway (one instance each)
- ``pdserve.up``: up (the whole system on this machine)
- ``pdserve.tools``: bench, soak, goodput (load tools against a running gateway)

Each handler imports what it runs inside itself, so ``pdserve generate`` loads no gRPC stack and
``pdserve --help`` loads no torch.
"""

from __future__ import annotations

import argparse
import sys

from engine.env import Env


def build_parser() -> argparse.ArgumentParser:
    from pdserve import __version__
    from pdserve.offline import add_offline_commands
    from pdserve.serve import add_serving_commands
    from pdserve.tools import add_tool_commands
    from pdserve.up import add_up_command

    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving")
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_offline_commands(sub)
    add_serving_commands(sub)
    add_up_command(sub)
    add_tool_commands(sub)
    for command in sub.choices.values():  # every subcommand's --help shows its defaults
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from pdserve.logs import setup_logging

    env = Env.read()
    args = build_parser().parse_args(argv)
    setup_logging(env.log_level, getattr(args, "log_format", "text"))
    try:
        return args.func(args, env)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
