"""`idlegrid`: one command line for the whole system.

Each subcommand lives with the code it drives; a module that owns one exposes
`add_arguments(parser)` and `run(args) -> int`. Errors a user can fix (bad
flags, bad config, a port in use) end in one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gateway.errors import UserError

# subcommand -> (module, help)
SUBCOMMANDS = {
    "up": ("gateway.up", "run everything on this machine: private Redis, gateway, a local fleet"),
    "gateway": ("gateway.serve", "run one gateway process against a Redis"),
    "worker": ("workers.agent", "enroll this machine's GPU engine with a gateway and keep it reporting"),
    "sim-engine": ("workers.sim.cli", "run simulated GPU engines that speak vLLM's API"),
    "admin": ("gateway.admin_cli", "manage keys, enrollment tokens and workers through a gateway"),
    "bench": ("benchmarks.cli", "measure latency, goodput, tokens/s and tokens/J of an endpoint"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not a usage dump
        self.exit(2, f"idlegrid: error: {message} (see --help)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="idlegrid", description="Turn idle GPUs into an OpenAI-compatible inference endpoint.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported: `idlegrid worker` should
        # not pay for matplotlib, nor `idlegrid bench` for uvicorn.
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # httpx logs every request it makes at INFO (qualification probes, heartbeats,
        # round-trip pings): hundreds of lines that say nothing, unless debugging.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args._module.run(args) or 0)
    except UserError as exc:
        print(f"idlegrid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
