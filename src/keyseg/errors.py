"""One exception hierarchy for everything KeySeg reports to a user.

The CLI catches :class:`KeySegError` once and prints ``str(error)`` as a single line
(``--debug`` shows the traceback). Messages name the thing (file, key, sample) and, where
possible, the fix.
"""

from __future__ import annotations


class KeySegError(Exception):
    """Base class of every error KeySeg raises on purpose."""


class KeySegConfigError(KeySegError):
    """A configuration value or key is wrong (unknown key, wrong type, bad value)."""


class KeySegDataError(KeySegError):
    """An input file or sample is missing, unreadable or malformed."""


class KeySegCheckpointError(KeySegError):
    """A checkpoint is missing, malformed or does not match the model."""


class KeySegInputError(KeySegError):
    """A model input is unusable (e.g. a training answer without a ``[SEG]`` token)."""
