"""One exception type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class BmmError(Exception):
    """A problem with the user's inputs or environment, explained in one line."""
