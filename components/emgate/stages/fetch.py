"""fetch_model: fill the model cache ($EMGATE_CACHE_DIR, a PVC on the cluster) before any stage needs a model.

Hub models download at their pinned commit and S3 models from their prefix; every file with a recorded sha256
(the recipe's, or the hub's own record of its LFS files) is checked before the folder appears in the cache.
PyPI GGUF models are built; `path` models are only checked. Later stages read the cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from emgate.models import FETCH_STAMP, resolve_model
from emgate.recipe import Recipe


def fetch_models(recipe: Recipe, out_dir: Path, verify_existing: bool = False) -> dict[str, Any]:
    """Resolve every model of the recipe into a local folder; write out_dir/models.json and return it."""
    from emgate.models import fetch_model

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"models": {}}
    for name, spec in recipe.models.items():
        started = time.monotonic()
        if spec.source in ("hub", "s3"):
            path = fetch_model(name, spec, verify_existing=verify_existing)
            sha256 = json.loads((path / FETCH_STAMP).read_text())["sha256"]
        else:
            path = resolve_model(name, spec)
            sha256 = {}
        report["models"][name] = {"source": spec.source, "path": str(path), "sha256": sha256,
                                  "seconds": round(time.monotonic() - started, 2)}
    (out_dir / "models.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report
