"""The SCHEME options as command-line flags, one per ``SchemeConfig`` field, the same for every command."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict

from ..config import CCA_SCALE_MODES, INIT_MODES, SchemeConfig
from ..kernels.cca import CCA_FORMS
from ..schedule import SCHEDULES

_CHOICES = {"cca_form": CCA_FORMS, "cca_scale_mode": CCA_SCALE_MODES, "init": INIT_MODES, "cca_anneal": SCHEDULES}


def _field_help() -> Dict[str, str]:
    """Each field's description, from the Attributes section of SchemeConfig's docstring: one text for both."""
    lines = (SchemeConfig.__doc__ or "").split("Attributes:", 1)[-1].splitlines()
    help_text: Dict[str, str] = {}
    name = None
    for line in lines:
        head, sep, rest = line.strip().partition(": ")
        if sep and head.isidentifier() and line.startswith(" " * 8) and not line.startswith(" " * 9):
            name, help_text[head] = head, rest
        elif name and line.strip():
            help_text[name] += " " + line.strip()
    return {k: v.replace("``", "").replace("%", "%%") for k, v in help_text.items()}


def add_scheme_flags(parser: argparse.ArgumentParser, title: str = "SCHEME options (SchemeConfig)") -> None:
    """``--groups``, ``--expansion``, ``--cca/--no-cca``, ... with default None: a flag not given leaves the
    field to whatever else decides it (SchemeConfig's default, or a checkpoint's recorded config)."""
    group = parser.add_argument_group(title)
    descriptions = _field_help()
    for field in dataclasses.fields(SchemeConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        shown = "resolved from the other options" if default is None else repr(default)
        help_text = f"{descriptions.get(field.name, field.name.replace('_', ' '))} (default: {shown})"
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field.name == "expansion":
            group.add_argument(flag, type=_float_or_none, default=None, metavar="E", help=help_text)
        else:
            kind = type(default) if default is not None else (
                int if "int" in str(field.type) else str if "str" in str(field.type) else float)
            group.add_argument(flag, type=kind, default=None, choices=_CHOICES.get(field.name), help=help_text)


def scheme_flags_given(args: argparse.Namespace) -> Dict[str, Any]:
    """The SchemeConfig fields given on the command line, by name."""
    options = {}
    for field in dataclasses.fields(SchemeConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            options[field.name] = None if value == "none" else value
    return options


def _float_or_none(text: str) -> Any:
    return "none" if text.lower() == "none" else float(text)
