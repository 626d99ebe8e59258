"""Errors a user can cause and fix; stages print their message instead of a traceback.

`glomeruli.core.stagekit.run_stage` (and the `glomeruli` command) turn a UserError into its message on one line
and exit code 1, so every message must name the file or key at fault and the way out.
"""


class UserError(Exception):
    """Base of every error whose message names the file or key at fault and the way out."""
