"""What resuming costs: the size of a saved stream state at 480p and 720p in bf16, and the time to
write it, for the full-size decoders.

    python benchmarks/resume.py

Sizes: each full-size decoder runs for real on the "meta" device (shapes, no data) over a few latent
frames, and the bytes of StreamDecoder.state_dict() are counted: exact, no GPU needed. Write cost: a
state of that many bytes (random bf16 tensors of the same shapes) is saved as a resume save is
(torch.save to a temporary file in the output's folder, renamed), on this machine's disk, timed. On
a GPU the copy to the host comes first (~10+ GB/s over PCIe 4, small beside the disk).

The default interval saves by time, at most 5% of the decode's (streamdec.resume); this also prints
how many latent frames that is at a given decode speed.
Results: docs/benchmarks/resume-cpu.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from _harness import ROOT, machine, save_results

SIZES = {"480p": (60, 104), "720p": (90, 160)}  # latent pixels of 832x480 and 1280x720 (4x/8x families)
FAMILIES = ("wan2.1", "wan2.2", "hunyuanvideo1.5")


def meta_vae(name: str):
    from streamdec.families import by_name
    from streamdec.families.hunyuan15 import Hunyuan15Config
    from streamdec.families.wan import WAN22, WanConfig
    from streamdec.vae import VAE

    family = by_name(name)
    config = {"wan2.1": WanConfig(), "wan2.2": WAN22, "hunyuanvideo1.5": Hunyuan15Config()}[name]  # released sizes
    with torch.device("meta"):
        decoder = family.build(config).to(torch.bfloat16)
    return VAE(family, config, decoder, torch.device("meta"), torch.bfloat16, torch.bfloat16, f"full-size {name}")


def state_after(vae, size: tuple[int, int], latent_frames: int) -> dict:
    from streamdec.memory import MemoryTrace
    from streamdec.stream import StreamDecoder

    stream = StreamDecoder(vae, normalized=False)
    scale = vae.spatial_ratio // 8  # the 16x families: the same picture from half the latent pixels
    h, w = (s // scale for s in size)
    z = torch.empty(1, vae.latent_channels, latent_frames, h, w, device="meta", dtype=torch.bfloat16)
    with MemoryTrace(device="meta"):  # what would park on the host is modelled, not copied
        for t in range(latent_frames):
            for _ in stream.decode_videos(z[:, :, t : t + 1]):
                pass
    return stream.state_dict()


def tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return [t for item in items for t in tensors(item)]


def write_seconds(state_tensors: list[torch.Tensor], folder: str) -> float:
    real = [torch.randn(t.shape, dtype=torch.bfloat16) for t in state_tensors]
    path = os.path.join(folder, "state.pt")
    started = time.perf_counter()
    torch.save(real, path + ".partial")
    with open(path + ".partial", "rb+") as f:
        os.fsync(f.fileno())  # on the disk, not only in the page cache
    os.replace(path + ".partial", path)
    took = time.perf_counter() - started
    os.unlink(path)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=3, help="latent frames decoded before the state is taken")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT) as folder:
        for name in FAMILIES:
            vae = meta_vae(name)
            for label, size in SIZES.items():
                state = state_after(vae, size, args.frames)
                found = tensors(state["stream"])
                nbytes = sum(t.numel() * t.element_size() for t in found)
                seconds = write_seconds(found, folder)
                rows.append({"family": name, "size": label, "state_mib": round(nbytes / 2**20, 1),
                             "write_s": round(seconds, 2), "write_mib_per_s": round(nbytes / 2**20 / seconds)})  # fmt: skip
                print(f"{name:16} {label}: state {nbytes / 2**20:8.1f} MiB, written in {seconds:.2f} s")
    results = {"device": "cpu", "machine": machine("cpu"), "latent_frames_before_state": args.frames,
               "what": "stream state size (bf16) and its write time on this machine's disk", "rows": rows}  # fmt: skip
    save_results(results, args.out, "resume")


if __name__ == "__main__":
    main()
