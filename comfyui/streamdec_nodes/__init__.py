"""streamdec for ComfyUI: a node that decodes a video LATENT straight into a video file.

Install: `pip install streamdec` in ComfyUI's Python, then copy (or link) this folder into
`ComfyUI/custom_nodes/`. The node appears as "Stream decode to video" under latent/video.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
