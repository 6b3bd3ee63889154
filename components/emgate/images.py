"""Container images of the components, named in one place.

Image = REGISTRY/emgate-STAGE:TAG, from $EMGATE_IMAGE_REGISTRY and $EMGATE_IMAGE_TAG (default
ghcr.io/emgate/emgate-STAGE:0.1.0). A release pins every image by digest: scripts/build-images.sh --push writes a
lock file (images/release.lock) of REGISTRY/emgate-STAGE@sha256:..., and $EMGATE_IMAGE_DIGESTS (or `lock=`) names
it. A recipe's `images` mapping overrides single stages and wins over both.

Order, first match wins: recipe `images[stage]` > lock file > $EMGATE_IMAGE_REGISTRY/$EMGATE_IMAGE_TAG > default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

DEFAULT_REGISTRY = "ghcr.io/emgate"
DEFAULT_TAG = "0.1.0"
DIGESTS_ENV = "EMGATE_IMAGE_DIGESTS"
# stage -> image folder under images/ (one Dockerfile + requirements.txt each)
STAGE_IMAGES = {
    "validate": "validate",
    "fetch": "fetch",
    "train": "train",
    "sample": "sample",
    "judge": "judge",
    "summarize": "summarize",
    "gate": "gate",
}
DIGEST_REF = re.compile(r"^[a-z0-9][a-z0-9._:/-]*(:[\w][\w.-]{0,127})?@sha256:[0-9a-f]{64}$")


class ImageLockError(ValueError):
    """A lock file of image digests that is missing, malformed or does not pin a stage by digest."""


def load_image_lock(path: str | Path) -> dict[str, str]:
    """stage -> digest-pinned image reference from a lock file written by scripts/build-images.sh.

    The file is YAML with an `images:` mapping (the same shape as a recipe's `images`), e.g.
    `images: {gate: registry.example/emgate-gate@sha256:<64 hex>}`. Every entry must name a known stage and be
    pinned by digest; anything else is refused, so a release never silently falls back to a moving tag.
    """
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ImageLockError(f"{path}: image lock file not found (set by ${DIGESTS_ENV} or lock=)") from None
    except yaml.YAMLError as err:
        raise ImageLockError(f"{path}: not valid YAML: {err}") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, dict) or not images:
        raise ImageLockError(f"{path}: expected a non-empty `images:` mapping of stage -> REGISTRY/emgate-STAGE@sha256:...")
    lock: dict[str, str] = {}
    for stage, ref in images.items():
        if stage not in STAGE_IMAGES:
            raise ImageLockError(f"{path}: images.{stage}: unknown stage (known: {', '.join(STAGE_IMAGES)})")
        if not isinstance(ref, str) or not DIGEST_REF.match(ref):
            raise ImageLockError(f"{path}: images.{stage}: {ref!r} is not pinned by digest (NAME@sha256:<64 hex>)")
        lock[stage] = ref
    return lock


def image_for(stage: str, overrides: dict[str, str] | None = None, lock: str | Path | None = None) -> str:
    """The image of one stage: the recipe's override, else the lock file's digest (`lock` or $EMGATE_IMAGE_DIGESTS),
    else REGISTRY/emgate-STAGE:TAG from the environment or the defaults."""
    if overrides and stage in overrides:
        return overrides[stage]
    if stage not in STAGE_IMAGES:
        raise KeyError(f"unknown stage {stage!r} (known: {', '.join(STAGE_IMAGES)})")
    lock = lock or os.environ.get(DIGESTS_ENV) or None
    if lock:
        pinned = load_image_lock(lock)
        if stage not in pinned:
            raise ImageLockError(f"{lock}: no digest for stage {stage!r}; rebuild with scripts/build-images.sh --push")
        return pinned[stage]
    registry = os.environ.get("EMGATE_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
    tag = os.environ.get("EMGATE_IMAGE_TAG", DEFAULT_TAG)
    return f"{registry}/emgate-{STAGE_IMAGES[stage]}:{tag}"
