"""KeySeg: keyword-conditioned reasoning segmentation."""

from keyseg.errors import (
    KeySegCheckpointError,
    KeySegConfigError,
    KeySegDataError,
    KeySegError,
    KeySegInputError,
)

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    # AutoConfig / AutoModel.from_pretrained of a KeySeg folder work after `import keyseg`.
    from keyseg.model.configuration import register_auto_classes

    register_auto_classes()


_register_with_transformers()

__all__ = [
    "KeySegCheckpointError",
    "KeySegConfigError",
    "KeySegDataError",
    "KeySegError",
    "KeySegInputError",
    "__version__",
]
