"""The ``timm-scheme`` command line: one sub-command per module, imported only when used."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

# sub-command -> (module defining add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "demo": ("timm_scheme.demo", "patch a timm model, train briefly on scikit-learn's digits, fuse, verify, report"),
    "export": ("timm_scheme.export", "training checkpoint -> fused, verified timm checkpoint folder (+ Hugging Face Hub push)"),
    "train": ("timm_scheme.train", "train a timm model with SCHEME mixers (timm's factories), then fuse, verify, export"),
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="timm-scheme", description="SCHEME channel mixers for timm models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
