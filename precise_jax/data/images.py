"""Real benign photos for image+text conditions: scikit-image's bundled samples (decoding: ports.processing)."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Union

from PIL import Image

from ports.errors import InputError

ImageLike = Union[str, os.PathLike, Image.Image]

# Real photographs shipped inside the scikit-image wheel (no download). Left out on purpose: page.png and
# text.png (they contain text, which would leak into a "benign image" condition), the horse silhouette and the
# synthetic logo/colour/chessboard images.
BENIGN_PHOTOS = (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg",
    "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg",
)


def benign_photos() -> list[Path]:
    """Paths of the real photographs bundled with scikit-image (astronaut, cat, coffee, rocket, ...)."""
    try:
        folder = Path(str(importlib.resources.files("skimage") / "data"))
    except ModuleNotFoundError as error:
        raise InputError("benign photos come from scikit-image: pip install scikit-image") from error
    paths = [folder / name for name in BENIGN_PHOTOS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"the installed scikit-image lacks sample images {missing} in {folder}; "
                         "reinstall scikit-image (never call skimage.data.download_all here)")
    return paths
