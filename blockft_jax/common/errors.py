"""Errors a user can fix (config, data, weights, workdir): the command line prints them as one
line, without a traceback. Anything else is a bug or a machine problem and keeps its traceback."""


class UserError(Exception):
    """A problem in what the user asked for or gave; its message says how to fix it."""
