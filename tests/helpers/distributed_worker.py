"""One rank of a distributed decode for tests/test_distributed.py and benchmarks/distributed.py.

Run as `python distributed_worker.py JOB OUT` with the env:// variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) set: joins the gloo group, runs the job's cases in order, and saves what
each case gave on this rank to OUT.rank<R>.pt. A case:

    {"vae": path, "latents": (C, T, h, w), "chunks": [latent frames per push], "as_tensor": bool,
     "tile": ..., "frames_per_call": int, "max_vram": GiB, "load": {load_vae options},
     "chunks_by_rank": {rank: chunks}}
        -> the frames rank 0 got, stacked (others: none), the bands' rows and the bytes sent
    {"vae": path, "latents": ..., "file": path, "die_after": {rank: pushes}}
        -> decode_to_file on rank 0; a rank named in die_after pushes that many chunks and exits
    any case raising StreamdecError      -> {"error": its message}
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import streamdec
from streamdec.errors import StreamdecError


def run_case(case: dict, vae, group):
    rank = dist.get_rank(group)
    z = case["latents"]
    if "file" in case:
        pushes = case.get("die_after", {}).get(rank)
        if pushes is None:
            written = streamdec.decode_to_file(vae, z, case["file"], group=group, codec="ffv1", progress=False,
                                               frames_per_call=1)  # fmt: skip
            return {"written": written}
        stream = streamdec.StreamDecoder(vae, group=group, frames_per_call=1)
        for t in range(pushes):
            stream.push(z[:, t : t + 1])
        os._exit(3)  # dies as a killed process does: no clean-up, no goodbye
    stream = streamdec.StreamDecoder(vae, as_tensor=case.get("as_tensor", True), tile=case.get("tile"),
                                     frames_per_call=case.get("frames_per_call", 1), max_vram=case.get("max_vram"),
                                     group=group)  # fmt: skip
    frames, start, began = [], 0, time.perf_counter()
    for n in case.get("chunks_by_rank", {}).get(rank) or case.get("chunks") or [z.shape[1]]:
        frames += stream.push(z[:, start : start + n])
        start += n
    bands, plan = stream.stream.bands, stream.plan
    frames += stream.close()
    seconds = time.perf_counter() - began
    out = {"seconds": seconds, "sent": dict(bands.sent), "rows": bands.rows, "plan": plan.describe()}
    if frames:  # (3, F, H, W) float, or (F, H, W, 3) uint8
        out["frames"] = torch.stack(frames, 1) if case.get("as_tensor", True) else torch.from_numpy(np.stack(frames))
    return out


def main(job_path: str, out_path: str) -> None:
    job = torch.load(job_path, weights_only=False)
    torch.set_num_threads(job.get("threads", 1))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job.get("timeout", 30)))
    group = dist.group.WORLD
    results, vaes = [], {}
    for case in job["cases"]:
        try:
            load = case.get("load", {})
            key = (case["vae"], tuple(sorted(load.items())))
            if key not in vaes:
                vaes[key] = streamdec.load_vae(case["vae"], device="cpu", **load)
            results.append(run_case(case, vaes[key], group))
        except StreamdecError as err:
            results.append({"error": str(err), "frames_written": getattr(err, "frames_written", None)})
    torch.save(results, f"{out_path}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
