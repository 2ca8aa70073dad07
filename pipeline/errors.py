"""`UserError`: a mistake the user can fix (bad flag or config value, missing file, unreachable broker at start).

`pipeline.cli.main` turns it into one line on stderr, `sinkstream: error: <message>`, and exit status 2; every
other exception is a bug and keeps its traceback. The message says what was expected and what arrived.
"""

from __future__ import annotations


class UserError(Exception):
    """A user mistake; the message is shown as is, without a traceback."""
