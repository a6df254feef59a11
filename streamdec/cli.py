"""The `streamdec` command: decode latents to video, describe a checkpoint, or run a demo.

Every expected failure (bad files, settings, a closed pipe or stream, Ctrl-C, SIGTERM) ends with
one line on stderr (when there is a stderr) and a non-zero exit status, never a traceback; and
nothing the user had is lost (streamdec.sinks.OutputFile).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import one_line

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM: stopped as Ctrl-C stops, the output closed with every frame so far."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other error, instead of usage + error
        _say(f"error: {message} (see {self.prog} --help)")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamdec", description="Stream video-diffusion latents into video.")
    parser.add_argument("--version", action="version", version=f"streamdec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    decode = commands.add_parser("decode", help="decode a latent file into a video file or stdout")
    decode.add_argument("latents", help="latent file: .safetensors, .pt/.pth or .npy, shaped (C,T,h,w) or (1,C,T,h,w)")
    decode.add_argument("--vae", required=True,
                        help="VAE checkpoint: .pth, .safetensors, a diffusers folder, or a Hugging Face Hub id (org/name)")  # fmt: skip
    decode.add_argument("-o", "--output", required=True, help="output video file, or - for stdout")
    _add_output_options(decode)
    _add_model_options(decode)
    _add_source_options(decode)
    _add_decode_options(decode)
    decode.add_argument("--raw-latents", action="store_true",
                        help="the latents are already de-normalized (as diffusers' vae.decode takes them)")  # fmt: skip
    decode.add_argument("--key", help="name of the latent tensor in a file that holds several")
    decode.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file (once the new one holds a frame)")  # fmt: skip
    decode.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    decode.add_argument("--resume", action="store_true",
                        help="keep the decode's state beside the output as it goes, and go on from where a killed "
                             "run of the same command stopped (needs an output file)")  # fmt: skip
    decode.add_argument("--resume-every", type=_positive_int, metavar="N",
                        help="with --resume: save the state every N latent frames (default: by time, at most 5%% "
                             "of the decode's time)")  # fmt: skip

    info = commands.add_parser("info", help="describe a VAE checkpoint")
    info.add_argument("checkpoint", help="a checkpoint file, a diffusers folder, or a Hub id (org/name)")
    _add_source_options(info)

    demo = commands.add_parser(
        "demo", help="decode generated latents with a small random-weight Wan 2.1 VAE (no download needed)"
    )
    demo.add_argument("-o", "--output", default="demo.mp4", help="output video file, or - for stdout")
    demo.add_argument("--latent-frames", type=int, default=17, help="latent frames (video frames = 1 + 4*(T-1))")
    demo.add_argument("--size", default="24x32", help="latent height x width (video is 8x larger)")
    demo.add_argument("--width", type=int, default=16, help="decoder base width (the released model has 96)")
    _add_output_options(demo)
    _add_model_options(demo, offload=False)
    demo.add_argument("--overwrite", action="store_true",
                      help="replace an existing output file (once the new one holds a frame)")  # fmt: skip
    demo.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=_fps_arg, default=16.0, help="frame rate (default 16, Wan's)")
    p.add_argument("--codec", help="libx264 (default), libx265, libsvtav1, ffv1, libx264rgb, ...")
    p.add_argument("--crf", type=int, help="quality (lower is better; default 18 for x264, 0 = lossless)")
    p.add_argument("--low-latency", action="store_true",
                   help="the encoder holds no frames back (x264/x265 zerolatency, SVT-AV1 low delay): a killed "
                        "run loses at most one frame, the file is somewhat larger")  # fmt: skip
    p.add_argument("--preset", help="encoder speed preset (default fast; svt-av1: 8)")
    p.add_argument("--pix-fmt", help="pixel format (default yuv420p)")
    p.add_argument("--format", help="container: mp4, mkv, webm, mov, nut, y4m, or rgb24 (raw, pipes); "
                                    "default from the extension, y4m for stdout")  # fmt: skip


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subfolder", help="the VAE's folder (or file) inside the checkpoint folder or Hub repository")
    p.add_argument("--revision", help="a Hub repository's branch, tag or commit (default: main)")


def _add_model_options(p: argparse.ArgumentParser, offload: bool = True) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default, exact), bf16 or fp16")
    p.add_argument("--tile", type=_tile_arg, default="auto",
                   help="decode in spatial tiles of N or HxW latent pixels (same output, less memory), "
                        "blended[:OVERLAP] (the reference's enable_tiling(), where it has one), none, or auto "
                        "(default: what --max-vram needs, else untiled)")  # fmt: skip
    if offload:
        p.add_argument("--offload", choices=["none", "model", "block", "auto"],
                       help="weights on the device (none, the default), there while a chunk decodes (model), "
                            "per block with prefetch (block), or what --max-vram needs (auto, its default)")  # fmt: skip
        p.add_argument("--max-vram", type=_gib_arg, metavar="GIB",
                       help="device memory the decode may peak at, in GiB: offload and tiles are chosen to fit")
    p.add_argument("--frames-per-call", type=_frames_per_call_arg, default="auto", metavar="N",
                   help="latent frames per decoder call: more is faster for small frames, same output, "
                        "activations grow with N (default auto: several for small frames, one from 192x192 up)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="compile the fused norm + SiLU kernels with torch.compile (a few seconds once, then "
                        "faster; same output to rounding)")  # fmt: skip


def _add_decode_options(p: argparse.ArgumentParser) -> None:
    """Options some families take (Family.decode_options), named as their pipelines name them."""
    p.add_argument("--decode-timestep", type=float, metavar="T",
                   help="LTX-Video 0.9.1+: the timestep the decoder is conditioned on (the pipelines' "
                        "decode_timestep, default 0)")  # fmt: skip
    p.add_argument("--decode-noise-scale", type=float, metavar="S",
                   help="LTX-Video 0.9.1+: mix the latents with this much noise first (default: the timestep)")
    p.add_argument("--seed", type=int, help="seed of the decode noise (LTX; default 0)")


def _decode_options(args) -> dict:
    names = ("decode_timestep", "decode_noise_scale", "seed")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def main(argv: list[str] | None = None) -> int:
    _reopen_closed_std_fds()
    signals = _Signals()
    target = None
    try:
        with signals:
            args = build_parser().parse_args(argv)
            if args.command == "demo" or (args.command == "decode" and _launched_rank() == 0):  # rank 0 writes
                target = _output_target(args.output, args.overwrite or _resumes(args))
            with signals.deferred():  # a C extension interrupted in its import can abort the process
                import torch  # noqa: F401

                from . import checkpoints, latents, stream  # noqa: F401
            _quiet_library_logs()
            return {"decode": run_decode, "info": run_info, "demo": run_demo}[args.command](args, target)
    except BaseException as err:
        stopped = signals.received  # whatever the signal surfaced as (a library may wrap or lose it)
        if stopped is None and not isinstance(err, KeyboardInterrupt):
            if isinstance(err, BrokenPipeError) or (isinstance(err, OSError) and _is_broken_pipe(err)):
                return _pipe_closed()
            if isinstance(err, (ValueError, OSError, RuntimeError)):  # StreamdecError is a ValueError
                if _is_broken_pipe(err):
                    return _pipe_closed()
                _say(f"error: {_explained(err)}{_what_was_kept(err, target)}")
                return EXIT_ERROR
            raise
        terminated = stopped == signal.SIGTERM or isinstance(err, Terminated)
        _say(f"{'terminated' if terminated else 'interrupted'}{_what_was_kept(err, target)}")
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


class _Signals:
    """While active: SIGTERM stops the run as Ctrl-C does (raising Terminated), and the signal that
    stopped it is remembered, so it is reported as such even where a library it interrupted (an
    import half done) turned it into another error. A SIGINT that was ignored when streamdec
    started (a background job, nohup) stays ignored. Outside the main thread nothing changes."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        self.deferring = False

    def _stop(self, signum, frame):
        self.received = signum
        if not self.deferring:
            self._raise()

    def _raise(self):
        raise Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()

    @contextmanager
    def deferred(self):
        """Hold a signal back until the block ends, then stop."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.received is not None:
            self._raise()

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self._stop)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _quiet_library_logs() -> None:
    """FFmpeg's error lines go into streamdec's one-line messages (PyAV puts the last one in its
    exceptions), not onto the terminal beside them; huggingface_hub's retry warnings neither."""
    import logging

    import av.logging
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()

    av.logging.set_level(av.logging.ERROR)
    logger = logging.getLogger("libav")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    logger.propagate = False


def run_decode(args, target) -> int:
    from .checkpoints import load_vae
    from .distributed import from_environment
    from .latents import read_latents

    device, group = from_environment(args.device)  # one of several processes torchrun started: join them
    try:
        latents = read_latents(args.latents, key=args.key)
        vae = load_vae(args.vae, device=device, dtype=args.dtype, offload=args.offload, max_vram=args.max_vram,
                       subfolder=args.subfolder, revision=args.revision, compile=args.compile,
                       **_decode_options(args))  # fmt: skip
        if _launched_rank() > 0:
            args.quiet = True  # rank 0 speaks for the decode
        return _decode(vae, latents, target, args, normalized=not args.raw_latents, group=group)
    finally:
        if group is not None:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _launched_rank() -> int:
    """This process's rank where a launcher (torchrun) started several, else 0."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def run_info(args, target=None) -> int:
    from .checkpoints import load_vae

    vae = load_vae(args.checkpoint, device="cpu", subfolder=args.subfolder, revision=args.revision)
    ratio = f"{vae.temporal_ratio}x time, {vae.spatial_ratio}x{vae.spatial_ratio} space"
    print(f"family            {vae.family} ({vae.family_spec.title})")
    print(f"source            {vae.source}")
    print(f"decoder params    {vae.num_parameters():,}")
    print(f"latent channels   {vae.latent_channels}")
    r = vae.temporal_ratio
    rule = f"T latent frames -> 1 + {r}(T-1) video frames"
    if any(vae.frames_for(t) != 1 + r * (t - 1) for t in range(1, 13)):  # a reference with its own count
        rule = "latent frames -> video frames: " + ", ".join(f"{t} -> {vae.frames_for(t)}" for t in range(1, 11))
    print(f"compression       {ratio}  ({rule})")
    print(f"stored dtype      {str(vae.stored_dtype).replace('torch.', '')}")
    return 0


def run_demo(args, target) -> int:
    import torch

    from .demo import demo_latents, demo_vae

    try:
        h, w = (int(s) for s in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must be HEIGHTxWIDTH in latent pixels, like 30x40, not {args.size!r}") from None
    vae = demo_vae(args.width, device=args.device, dtype=args.dtype, compile=args.compile)
    latents = demo_latents(args.latent_frames, h, w, generator=torch.Generator().manual_seed(0))
    return _decode(vae, latents, target, args, normalized=True)


def _decode(vae, latents, target, args, normalized: bool, group=None) -> int:
    from .stream import decode_to_file

    to_stdout = not isinstance(target, Path)
    format = args.format or ("y4m" if to_stdout else None)
    if getattr(args, "resume_every", None) and not args.resume:
        raise ValueError("--resume-every sets how often --resume saves; add --resume, or drop --resume-every")
    if vae.max_vram is not None and not args.quiet and group is None:  # say what the budget chose (decode_to_file reuses it)
        from .latents import as_latents
        from .stream import StreamDecoder

        z = as_latents(latents, vae.latent_channels)
        planned = StreamDecoder(vae, tile=args.tile, frames_per_call=args.frames_per_call, **_decode_options(args))
        planned.start(tuple(z.shape[-2:]), z.shape[2])
        _say(f"max-vram {vae.max_vram:g} GiB: {planned.plan.describe()}")
    written = decode_to_file(
        vae, latents, target, fps=args.fps, codec=args.codec, crf=args.crf, preset=args.preset,
        pix_fmt=args.pix_fmt, format=format, normalized=normalized, progress=not args.quiet, tile=args.tile,
        low_latency=args.low_latency, frames_per_call=args.frames_per_call,
        resume=getattr(args, "resume", False), resume_every=getattr(args, "resume_every", None), group=group,
    )  # fmt: skip
    if not args.quiet and not to_stdout:
        h, w = (s * vae.spatial_ratio for s in latents.shape[-2:])
        _say(f"wrote {written} frames of {w}x{h} at {args.fps:g} fps to {target}")
    return 0


def _tile_arg(text: str):
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    if text.lower().startswith("blended"):
        from .tiling import parse_tile

        try:
            return parse_tile(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected blended or blended:OVERLAP, like blended:0.125, not {text!r}") from None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW latent pixels, like 32 or 24x40, auto or none, not {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _frames_per_call_arg(text: str):
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, or auto, not {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, not {text!r}")
    return value


def _gib_arg(text: str) -> float:
    try:
        gib = float(text)
    except ValueError:
        gib = 0.0
    if not 0 < gib < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, like 20 or 7.5, not {text!r}")
    return gib


def _fps_arg(text: str) -> float:
    from .sinks import SinkError, frame_rate

    try:
        fps = float(text)
        frame_rate(fps)
    except (ValueError, SinkError):
        raise argparse.ArgumentTypeError(f"expected a frame rate from 0.01 to 1000, like 16, 24 or 23.976, not {text!r}") from None
    return fps


def _resumes(args) -> bool:
    """--resume, and a killed run of this output left its state: the file is this job's to go on with."""
    if not getattr(args, "resume", False) or args.output == "-":
        return False
    from .resume import Checkpoints

    return Checkpoints(args.output).exists()


def _output_target(output: str, overwrite: bool):
    """stdout's binary stream for "-", else a path checked to be writable and new (or --overwrite);
    a device or a pipe (/dev/null, a FIFO) is written in place and needs no --overwrite."""
    if output == "-":
        if sys.stdout is None:
            raise ValueError("stdout is closed; give -o FILE, or let the video go to a pipe (-o - | ffmpeg -i - out.mp4)")
        if sys.stdout.isatty():
            raise ValueError("refusing to write video to a terminal; pipe it (| ffmpeg -i - out.mp4) or use -o FILE")
        return sys.stdout.buffer
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name such as {path / 'video.mp4'}")
    if path.is_file() and not overwrite:
        raise ValueError(f"output {path} already exists; add --overwrite to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: no permission to write in {folder}")
    return path


def _what_was_kept(err: BaseException, target) -> str:
    """What an interrupted or failed decode left, for the end of its message."""
    if not isinstance(target, Path):
        return ""
    frames = getattr(err, "frames_written", None)  # set by decode_to_file once the file was opened
    if frames:
        return f"; {target} holds the {frames} frames decoded so far"
    if frames == 0 or isinstance(err, KeyboardInterrupt):
        return f"; nothing was written to {target}" + (" (the file there is unchanged)" if target.exists() else "")
    return ""


def _explained(err: BaseException) -> str:
    """The line to print for an error: its own, with the way out for the ones that need it."""
    text = one_line(err)
    if isinstance(err, OSError) and err.filename:
        text = f"{err.filename}: {text}"
    if type(err).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return (f"the device ran out of memory ({text}); try --max-vram GIB (it plans offload and tiles to fit), "
                "--offload block, --tile 32 or --dtype bf16")  # fmt: skip
    return text


def _reopen_closed_std_fds() -> None:
    """A closed stdin, stdout or stderr (`>&-`) gets /dev/null, so that no file streamdec opens takes its
    number and has messages or pipes written into it. Python has then set sys.stdout/stderr to None."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def _pipe_closed() -> int:
    """The reader of our stdout went away: stop quietly, like other Unix filters."""
    try:  # further writes (and Python's exit flush) must not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    except OSError:
        pass
    return 128 + signal.SIGPIPE


def _is_broken_pipe(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.EPIPE or "Broken pipe" in str(err)


def _say(message: str) -> None:
    if sys.stderr is not None:  # closed (2>&-): the exit status still says it
        print(f"streamdec: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
