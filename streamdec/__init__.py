"""streamdec: stream video-diffusion latents through their VAE decoder, frame by frame.

    vae = streamdec.load_vae("Wan2.1_VAE.pth")
    for frame in streamdec.decode_frames(vae, latents):   # numpy uint8 (H, W, 3)
        ...
"""

from .checkpoints import CheckpointError, load_vae
from .errors import StreamdecError
from .memory import BudgetError
from .sinks import SinkError
from .stream import StreamDecoder, decode_frames, decode_to_file
from .vae import VAE

__all__ = ["load_vae", "decode_frames", "decode_to_file", "StreamDecoder", "VAE", "StreamdecError", "CheckpointError",
           "SinkError", "BudgetError"]
__version__ = "0.1.0"
