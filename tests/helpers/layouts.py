"""The layouts every diffusers model reaches users in: the live object, its own folder, and a
pipeline folder holding it as `vae/`."""

from __future__ import annotations

import json
from pathlib import Path


def diffusers_layouts(model, root: Path, pipeline_class: str) -> dict:
    """{"live-object", "diffusers-folder", "diffusers-pipeline"} for `model`, saved under `root`."""
    model.save_pretrained(root / "diffusers-vae")
    model.save_pretrained(root / "pipeline" / "vae")
    (root / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return {"live-object": model, "diffusers-folder": root / "diffusers-vae", "diffusers-pipeline": root / "pipeline"}
