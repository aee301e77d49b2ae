"""Errors that mean "the user asked for something wrong": printed as one line, exit code 2."""


class UserError(Exception):
    """Bad input: a missing file, an unknown option value, an unsupported setting.

    The CLI prints `error: <message>` and exits with 2, without a traceback.
    """
