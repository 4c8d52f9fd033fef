"""User-facing errors: raised at boundaries (CLI, file loading, config validation)."""


class MicronetError(Exception):
    """An error caused by user input; the CLI prints its message on one line and exits non-zero."""

    exit_code = 2
