"""One exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class LmlabError(Exception):
    """A user-facing error whose message names the file, line, field or value at fault."""
