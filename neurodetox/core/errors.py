"""The one error type for a user's mistake.

Library functions raise :class:`UserError` (a :class:`ValueError`, so existing
``except ValueError`` keeps working) for a bad value, path or file that the user
can fix. The command line prints it as one line, ``neurodetox COMMAND: error:
MESSAGE``, and exits with code 2; with ``NEURODETOX_DEBUG=1`` it also prints the
traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the bad value and what is valid."""
