"""Errors a user can cause and fix; stages print their message instead of a traceback."""


class UserError(Exception):
    """Base of every error whose message names the file or key at fault and the way out."""
