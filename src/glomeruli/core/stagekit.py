"""What every stage script shares: logging, params, and a clean exit on errors a user can fix.

A stage script parses `--params`, calls one package function and writes its outputs through
`core.atomic.atomic_path`; `run_stage` quiets the libraries' start-up lines, sets up logging and turns a
`UserError` into one clear line and exit code 1, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from glomeruli.core.errors import UserError
from glomeruli.core.logs import quiet_startup, setup_logging
from glomeruli.core.params import Params, ParamsError, load_params

log = logging.getLogger("glomeruli.stage")


def run_stage(name: str, main: Callable[[Params], None]) -> None:
    """Parse --params, validate every setting, run `main`; user errors exit 1 with one clear line."""
    quiet_startup()  # first: the stage's `main` imports Keras
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=f"DVC stage `{name}`")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    setup_logging()
    try:
        params = load_params(args.params)
        log.info("stage %s starting", name)
        main(params)
        log.info("stage %s done", name)
    except (UserError, ParamsError, FileNotFoundError) as err:
        log.error("stage %s failed: %s", name, err)
        sys.exit(1)
