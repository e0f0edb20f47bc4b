"""Run one of timm's own scripts (train.py, validate.py, benchmark.py, ...) as a user of timm-scheme would:
``import timm_scheme`` first (it registers the SCHEME architectures), and with ``--scheme`` the one line a
user adds to train.py, right after its ``model = create_model(...)``:

    timm_scheme.scheme_patch(model, **SCHEME_OPTIONS)

    python examples/drop_in/with_patch.py [--scheme '{"groups": 4, "expansion": 8}' [--only PREFIX]] PATH/TO/train.py [its args]

The script is run unchanged from its own file (never copied): the line is applied by wrapping timm's
``create_model`` for the duration of the run, which is the same as writing it after the script's one
``create_model`` call.
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default=None, metavar="JSON",
                        help="scheme_patch keyword arguments as a JSON object; omit to run the script as it is")
    parser.add_argument("--only", default=None, metavar="PREFIX",
                        help="patch only the MLPs whose module name starts with PREFIX (a filter_fn in the line)")
    parser.add_argument("script", help="path of the timm script to run")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    import timm
    import timm.models
    import timm_scheme  # noqa: F401  (what a user of SCHEME checkpoints and models imports)

    if args.scheme is not None:
        options = json.loads(args.scheme)
        if args.only is not None:
            options["filter_fn"] = lambda module, name: name.startswith(args.only)
        create_model = timm.models.create_model
        calls = []

        def create_model_then_patch(*a, **k):
            model = create_model(*a, **k)
            if not calls:  # the script's model; later calls (none in train.py) are left alone
                timm_scheme.scheme_patch(model, **options)
            calls.append(a[0] if a else k.get("model_name"))
            return model

        timm.create_model = timm.models.create_model = create_model_then_patch
    sys.argv = [args.script, *args.script_args]
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
