"""KeySeg: keyword-conditioned reasoning segmentation."""

from keyseg.errors import (
    KeySegCheckpointError,
    KeySegConfigError,
    KeySegDataError,
    KeySegError,
    KeySegInputError,
)

__version__ = "0.1.0"

__all__ = [
    "KeySegCheckpointError",
    "KeySegConfigError",
    "KeySegDataError",
    "KeySegError",
    "KeySegInputError",
    "__version__",
]
