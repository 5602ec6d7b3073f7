"""Errors meant for users: one line that names the file or value and says what to do."""


class EdgecError(Exception):
    """A problem with the user's input or environment; the CLI prints it on one line."""

    exit_code = 1


class UsageError(EdgecError):
    """Invalid input: a missing path, an unsupported model, a bad option value (exit 2)."""

    exit_code = 2


class CheckFailed(EdgecError):
    """The artifact was built but failed a check such as a validation gate (exit 1)."""

    exit_code = 1
