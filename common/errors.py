"""The one exception every module may raise for a mistake the user can fix; imports nothing of the project."""


class UserError(Exception):
    """A bad flag value, a missing or malformed file, a refused request: printed as one line, exit 1."""
