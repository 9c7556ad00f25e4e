"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UserError(ValueError):
    """A problem with the user's input (path, flag, data, model) rather than a bug in d2prune."""
