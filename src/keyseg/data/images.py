"""The data layer's door for image files: :func:`load_image` and friends (implemented in the
leaf module :mod:`keyseg.images`, so the processor's transforms below the data layer read
images the same way). SAM's input transforms live with the processor, in
:mod:`keyseg.transforms`.
"""

from keyseg.images import DEFAULT_MAX_PIXELS, as_rgb_image, load_image

__all__ = ["DEFAULT_MAX_PIXELS", "as_rgb_image", "load_image"]
