"""ImageNet (ILSVRC-2012) as a preparation source: the synset folder layout, class order and the standard variants.

Layout read: ``<root>/<wnid>/<file>.JPEG`` (the extracted ``ILSVRC2012_img_train.tar`` after each class tar is
unpacked into its own folder; the Kaggle copy has it at ``ILSVRC/Data/CLS-LOC/train``). Class index = position of the
WordNet id in sorted order (n01440764 -> 0, ..., n15075141 -> 999), the convention of torchvision's ``ImageFolder``,
ADM, EDM and DiT; images are ordered class-major, then by file name. 1 281 167 training images.

Standard variants (``data.transforms``):
- ImageNet-64 (EDM): 64x64 uint8 pixels, class-conditional, EDM's ``center-crop`` (largest central square, LANCZOS;
  the default of ``python -m data.prepare imagenet``). ADM's own ImageNet-64 used ``center_crop_arr`` (``adm``).
- ImageNet-256 / 512 (DiT, EDM2, Hang et al. 2024): 256x256 / 512x512 crops by ADM's ``center_crop_arr`` (``adm``),
  usually encoded to SD-VAE latents (32x32x4 / 64x64x4, ``data.latents``).
"""

from __future__ import annotations

import os
import re

from .image_source import ImageSource

__all__ = ["imagenet_source", "IMAGENET_TRAIN_IMAGES", "IMAGENET_CLASSES", "WNID_PATTERN"]

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_CLASSES = 1000
WNID_PATTERN = re.compile(r"^n\d{8}$")


def imagenet_source(path: str | os.PathLike) -> ImageSource:
    """The ILSVRC train folder as an ImageSource labelled by sorted synset folder; clear errors on other layouts."""
    source = ImageSource(path, labels="dirs")
    odd = [c for c in source.class_names if not WNID_PATTERN.match(c)]
    if odd:
        raise ValueError(
            f"'{source.path}' does not look like the ILSVRC train folder: its class sub-folders should be WordNet ids "
            f"such as n01440764, found {odd[:3]}{' ...' if len(odd) > 3 else ''}; for another labelled folder use "
            f"`python -m data.prepare folder --labels dirs`"
        )
    return source
