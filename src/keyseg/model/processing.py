"""What the model needs of its processor, and how a saved directory's processor is found.

The processor (:class:`keyseg.processor.KeySegProcessor`) sits one layer *above* the model:
it owns the image transforms, which the model never imports. A model holds its processor
(injected by whoever assembles it: ``keyseg.build.build_keyseg``, the converters) and uses
only what :class:`ModelProcessor` names: the special-token ids and ``save_pretrained``.

:meth:`KeySegModel.from_pretrained <keyseg.model.keyseg.KeySegModel.from_pretrained>` attaches
the processor saved next to the weights through the loader installed here with
:func:`install_processor_loader`; ``import keyseg`` (the package, the composition root that
every import of ``keyseg.model`` runs first) installs ``KeySegProcessor.from_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from keyseg.config import BackboneConfig
from keyseg.errors import KeySegCheckpointError

if TYPE_CHECKING:  # keeps ``import keyseg`` free of torch
    from keyseg.tokens import SpecialTokenIds


class ModelProcessor(Protocol):
    """The processor as the model sees it."""

    ids: SpecialTokenIds
    """Token ids of ``[SEG]``, ``[KEY]``, the image placeholder, padding, ... as the LM
    sees them."""

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the processor's files (tokenizer, image processor, sizes) into ``directory``."""


#: ``(model directory, backbone config) -> processor`` of a saved model.
ProcessorLoader = Callable[[str | os.PathLike, BackboneConfig], ModelProcessor]

_loader: ProcessorLoader | None = None


def install_processor_loader(loader: ProcessorLoader) -> None:
    """Make ``loader`` the way saved processors are read (idempotent; the last one wins)."""
    global _loader
    _loader = loader


def load_processor(directory: str | os.PathLike, backbone: BackboneConfig) -> ModelProcessor:
    """The processor saved in ``directory``, read by the installed loader."""
    if _loader is None:
        raise KeySegCheckpointError(
            f"{directory}: no processor loader installed (import keyseg first)")
    return _loader(directory, backbone)
