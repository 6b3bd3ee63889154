"""Container images of the components, named in one place.

Image = REGISTRY/emgate-STAGE:TAG, from $EMGATE_IMAGE_REGISTRY and $EMGATE_IMAGE_TAG, and a recipe's `images`
mapping overrides single stages (for example a digest-pinned release: registry/emgate-train@sha256:...).
"""

from __future__ import annotations

import os

DEFAULT_REGISTRY = "ghcr.io/emgate"
DEFAULT_TAG = "0.1.0"
# stage -> image folder under images/ (one Dockerfile + requirements.txt each)
STAGE_IMAGES = {
    "validate": "validate",
    "train": "train",
    "sample": "sample",
    "judge": "judge",
    "summarize": "summarize",
    "gate": "gate",
}


def image_for(stage: str, overrides: dict[str, str] | None = None) -> str:
    if overrides and stage in overrides:
        return overrides[stage]
    registry = os.environ.get("EMGATE_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
    tag = os.environ.get("EMGATE_IMAGE_TAG", DEFAULT_TAG)
    return f"{registry}/emgate-{STAGE_IMAGES[stage]}:{tag}"
