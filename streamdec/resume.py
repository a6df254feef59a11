"""Resumable decodes: the stream's state kept beside the output, so a killed decode goes on where it stopped.

With `decode_to_file(..., resume=True)` (CLI `--resume`) a folder beside the output, `.NAME.resume/`,
holds what the job is (`job.json`: a digest of the latents, of the VAE's weights, and every setting
that shapes the output) and, every so often, the StreamDecoder's state between two pushes: caches,
window buffers and counters, never a decoded frame, in a file named by the latent frames pushed and
the video frames decoded by then. A state is written to a temporary file and renamed, so a kill
while writing leaves the one before it.

A run with resume=True that finds the folder checks it is the same job (refusing in one line if
not), takes the newest state whose frames the output already holds whole (the encoder and the
writer's queue lag the decoder, so the newest may not be covered yet: the last `KEEP` are kept),
copies those frames into a new file beside the output, which takes the output's place, and goes on
from that state. A lossless codec gives the very file an uninterrupted run gives; a lossy one
starts a new group of pictures where it went on, with the same frames and timestamps. Packets go
in display order (no B-frames) in a resumable run, so a later run can append to them.

When to save: every `every` latent frames, or by default whenever the decode has run 20 times as
long as the last save took, and `MIN_INTERVAL` seconds at least, so saving costs 5% of the time at
most. The folder is removed when the decode finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .errors import StreamdecError

KEEP = 3  # states kept: the output can lag the newest by the encoder's lookahead and the writer's queue
MIN_INTERVAL = 10.0  # seconds between saves at least, when saving by time
MAX_SHARE = 0.05  # of decode time that saving may take, when saving by time


class ResumeError(StreamdecError):
    pass


def job_of(vae, z: torch.Tensor, settings: dict) -> dict:
    """What makes a decode this decode: the latents, the weights, the settings that shape the output."""
    return {"latents": _tensor_digest(z), "vae": _weights_digest(vae), "family": vae.family,
            "settings": {k: _plain(v) for k, v in sorted(settings.items())}}  # fmt: skip


class Checkpoints:
    """The resume folder of one output file."""

    def __init__(self, path, every: int | None = None):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ResumeError(f"resume_every must be a whole number of latent frames, 1 or more, not {every!r}")
        final = Path(os.path.realpath(path))
        self.output = final
        self.folder = final.with_name(f".{final.name}.resume")
        self.every = every
        self.last_save = (time.monotonic(), 0.0)  # when the last save ended, how long it took
        self.last_frames_in = 0

    def exists(self) -> bool:
        return (self.folder / "job.json").is_file()

    def begin(self, job: dict) -> dict | None:
        """Check the folder against `job` and return the state to go on from (None: from the start,
        the folder made ready for this job)."""
        from .sinks import complete_frames

        if self.exists():
            before = json.loads((self.folder / "job.json").read_text())
            difference = _difference(before, job)
            if difference:
                raise ResumeError(f"cannot resume {self.output.name}: {difference} since the interrupted run; "
                                  f"decode with the same ones, or remove {self.folder} to start over")  # fmt: skip
            whole = complete_frames(self.output) if self.output.is_file() else 0
            for frames_in, frames_out, file in self._states():
                if frames_out <= whole:
                    state = torch.load(file, map_location="cpu", weights_only=True)
                    self.last_frames_in = frames_in
                    return state
        self.remove()
        self.folder.mkdir()
        _write_atomically(self.folder / "job.json", json.dumps(job, indent=1).encode())
        return None

    def due(self, frames_in: int) -> bool:
        if self.every is not None:
            return frames_in - self.last_frames_in >= self.every
        ended, took = self.last_save
        return time.monotonic() - ended >= max(MIN_INTERVAL, took / MAX_SHARE)

    def save(self, state: dict) -> None:
        """Keep `state` (a StreamDecoder.state_dict()) and drop all but the newest KEEP."""
        started = time.monotonic()
        name = f"{state['frames_in']:09d}-{state['frames_out']:09d}.pt"
        temporary = self.folder / f".{name}.partial"
        torch.save(state, temporary)
        os.replace(temporary, self.folder / name)
        for _, _, old in self._states()[KEEP:]:
            old.unlink(missing_ok=True)
        self.last_frames_in = state["frames_in"]
        ended = time.monotonic()
        self.last_save = (ended, ended - started)

    def remove(self) -> None:
        if self.folder.is_dir():
            for file in self.folder.iterdir():
                file.unlink()
            self.folder.rmdir()

    def _states(self) -> list[tuple[int, int, Path]]:
        """(latent frames in, video frames out, file) of each saved state, newest first."""
        states = []
        for file in self.folder.glob("*.pt"):
            try:
                frames_in, frames_out = (int(n) for n in file.stem.split("-"))
            except ValueError:
                continue
            states.append((frames_in, frames_out, file))
        return sorted(states, reverse=True)


def _difference(before: dict, now: dict) -> str:
    if before.get("family") != now["family"] or before.get("vae") != now["vae"]:
        return "the VAE's weights differ"
    if before.get("latents") != now["latents"]:
        return "the latents differ"
    for key, value in now["settings"].items():
        if before["settings"].get(key) != value:
            return f"{key.replace('_', ' ')} changed ({before['settings'].get(key)} -> {value})"
    return ""


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    digest = hashlib.blake2b(str((tuple(t.shape), str(t.dtype))).encode(), digest_size=16)
    digest.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def _weights_digest(vae) -> str:
    """A digest of the decoder's weights: each tensor's name, shape and sums (where an offloader
    holds the weights, its resting copies), cheap on any device."""
    rest = getattr(vae.offloader, "rest", {}) if vae.offloader is not None else {}
    digest = hashlib.blake2b(digest_size=16)
    for name, p in vae.decoder.named_parameters():
        t = rest.get(p, p).detach().double().flatten()
        position = torch.linspace(1, 2, t.numel(), dtype=t.dtype, device=t.device)  # tells permutations apart
        sums = torch.stack([t.sum(), t.abs().sum(), (t * position).sum()])
        digest.update(f"{name}{tuple(t.shape)}{sums.tolist()}".encode())
    return digest.hexdigest()


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    return str(value)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(data)
    os.replace(temporary, path)
