"""The ``timm-scheme`` command line: argument parsing and printing only; the work is the library's.
Only the sub-command that runs is imported."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

# sub-command -> (module defining add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "demo": ("timm_scheme.cli.demo", "patch a timm model, train briefly on scikit-learn's digits, fuse, verify, report"),
    "export": ("timm_scheme.cli.export", "training checkpoint -> fused, verified timm checkpoint folder (+ Hugging Face "
                                         "Hub push, ONNX, TorchScript)"),
    "train": ("timm_scheme.cli.train", "train a timm model with SCHEME mixers (timm's factories), then fuse, verify, "
                                       "export"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="timm-scheme", description="SCHEME channel mixers for timm models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
