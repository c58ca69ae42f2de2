"""KeySeg: keyword-conditioned reasoning segmentation."""

from keyseg.errors import (
    KeySegCheckpointError,
    KeySegConfigError,
    KeySegDataError,
    KeySegError,
    KeySegInputError,
)

__version__ = "0.1.0"


def _load_processor(directory, backbone):
    """``KeySegProcessor.from_pretrained``, imported on first use (see
    :mod:`keyseg.model.processing`: the model does not import the processor layer)."""
    from keyseg.processor import KeySegProcessor

    return KeySegProcessor.from_pretrained(directory, backbone)


def _wire() -> None:
    """The package is the composition root: it registers the Auto classes (so AutoConfig /
    AutoModel.from_pretrained of a KeySeg folder work after ``import keyseg``) and installs
    the processor loader that ``KeySegModel.from_pretrained`` uses."""
    from keyseg.model.auto import register_auto_classes
    from keyseg.model.processing import install_processor_loader

    register_auto_classes()
    install_processor_loader(_load_processor)


_wire()

__all__ = [
    "KeySegCheckpointError",
    "KeySegConfigError",
    "KeySegDataError",
    "KeySegError",
    "KeySegInputError",
    "__version__",
]
