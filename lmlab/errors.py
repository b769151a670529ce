"""One exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class LmlabError(Exception):
    """A user-facing error whose message names the file, line, field or value at fault."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when the message is empty."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__
