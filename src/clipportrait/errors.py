"""Errors meant for the user: the CLI prints their message as one paragraph, without a traceback."""


class UserError(Exception):
    """Bad input (file, key, value) or a state the user must fix; the message says what and how."""
