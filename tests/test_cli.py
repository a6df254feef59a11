"""The command line as a user meets it: decoding, pipes, interruptions and every bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import streamdec
from streamdec.cli import main

LATENTS = torch.randn(16, 3, 5, 7, generator=torch.Generator().manual_seed(7))


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamdec", *map(str, args)], capture_output=True, timeout=300, **kwargs)


def assert_clean_error(capsys, code: int, *fragments: str):
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamdec: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def files(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = {"vae": checkpoints["official-pth"]}
    paths["safetensors"] = root / "z.safetensors"
    save_file({"latents": LATENTS.contiguous()}, paths["safetensors"])
    paths["pt"] = root / "z.pt"
    torch.save({"samples": LATENTS[None]}, paths["pt"])
    paths["npy"] = root / "z.npy"
    np.save(paths["npy"], LATENTS.numpy())
    paths["long"] = root / "long.npy"  # long enough to be interrupted mid-way
    np.save(paths["long"], torch.randn(16, 400, 5, 7, generator=torch.Generator().manual_seed(8)).numpy())
    return paths


@pytest.fixture(scope="module")
def expected_frames(checkpoints):
    return list(streamdec.decode_frames(streamdec.load_vae(checkpoints["official-pth"], device="cpu"), LATENTS))


def decoded(path, **kwargs) -> list[np.ndarray]:
    with av.open(str(path), **kwargs) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("kind", ["safetensors", "pt", "npy"])
def test_decode_latent_files_losslessly(files, tmp_path, expected_frames, capsys, kind):
    out = tmp_path / "out.mkv"
    assert main(["decode", str(files[kind]), "--vae", str(files["vae"]), "-o", str(out), "--codec", "ffv1"]) == 0
    assert "wrote 9 frames of 56x40 at 16 fps" in capsys.readouterr().err
    assert all(np.array_equal(a, b) for a, b in zip(decoded(out), expected_frames))


def test_raw_latents_flag(files, checkpoints, tmp_path, capsys):
    vae = streamdec.load_vae(checkpoints["official-pth"], device="cpu")
    raw = vae.denormalize(LATENTS[None])
    np.save(tmp_path / "raw.npy", raw.numpy())
    out = tmp_path / "out.mkv"
    assert main(["decode", str(tmp_path / "raw.npy"), "--vae", str(files["vae"]), "-o", str(out),
                 "--codec", "ffv1", "--raw-latents", "--quiet"]) == 0  # fmt: skip
    expected = list(streamdec.decode_frames(vae, LATENTS))
    assert all(np.array_equal(a, b) for a, b in zip(decoded(out), expected))
    assert capsys.readouterr().err == ""


def test_y4m_through_an_os_pipe(files, expected_frames):
    proc = subprocess.Popen([sys.executable, "-m", "streamdec", "decode", str(files["npy"]), "--vae", str(files["vae"]),
                             "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    frames = decoded_stream(proc.stdout)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert len(frames) == len(expected_frames)
    # y4m carries yuv420p: the same pictures up to chroma subsampling
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(frames, expected_frames)]) < 20


def decoded_stream(stream) -> list[np.ndarray]:
    with av.open(stream, format="yuv4mpegpipe") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("fmt", ["rgb24", "nut", "matroska", "mp4"])
def test_other_pipe_formats(files, expected_frames, fmt):
    proc = run_cli("decode", files["npy"], "--vae", files["vae"], "-o", "-", "--format", fmt, "--codec",
                   *(["libx264rgb"] if fmt != "rgb24" else ["rawvideo"]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    if fmt == "rgb24":
        assert proc.stdout == b"".join(f.tobytes() for f in expected_frames)
    else:
        import io

        frames = [f.to_ndarray(format="rgb24") for f in av.open(io.BytesIO(proc.stdout)).decode(video=0)]
        assert all(np.array_equal(a, b) for a, b in zip(frames, expected_frames)) and len(frames) == 9


def test_reader_closing_the_pipe_ends_quietly(files):
    proc = subprocess.Popen([sys.executable, "-m", "streamdec", "decode", str(files["long"]), "--vae", str(files["vae"]),
                             "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.read(50_000)
    proc.stdout.close()
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Exception" not in err, err
    assert code != 0 and err.strip() == ""


def wait_for(condition, timeout=120.0):
    start = time.time()
    while not condition():
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


def test_killed_process_leaves_a_playable_mp4(files, tmp_path):
    out = tmp_path / "killed.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "streamdec", "decode", str(files["long"]), "--vae", str(files["vae"]),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: out.exists() and out.read_bytes().count(b"moof") >= 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # really killed mid-way, not finished
    assert 1 <= len(decoded(out)) < 1 + 4 * 399


def test_ctrl_c_closes_the_file_cleanly(files, tmp_path):
    out = tmp_path / "interrupted.mkv"
    proc = subprocess.Popen([sys.executable, "-m", "streamdec", "decode", str(files["long"]), "--vae", str(files["vae"]),
                             "-o", str(out), "--codec", "ffv1"], stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    wait_for(lambda: out.exists() and out.stat().st_size > 200_000)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 130 and "Traceback" not in err and "interrupted" in err
    frames = decoded(out)
    assert 1 <= len(frames) < 1 + 4 * 399
    with av.open(str(out)) as container:  # closed properly: the container knows its duration
        assert container.duration is not None


def test_info(files, capsys):
    assert main(["info", str(files["vae"])]) == 0
    out = capsys.readouterr().out
    assert "wan2.1" in out and "latent channels   16" in out and "4x time, 8x8 space" in out and "float32" in out


# ---------------------------------------------------------------------------- bad input


def test_missing_latent_file(files, tmp_path, capsys):
    code = main(["decode", str(tmp_path / "nope.npy"), "--vae", str(files["vae"]), "-o", str(tmp_path / "o.mp4")])
    assert_clean_error(capsys, code, "nope.npy does not exist")
    assert not (tmp_path / "o.mp4").exists()


def test_corrupt_latent_file(files, tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    code = main(["decode", str(tmp_path / "bad.safetensors"), "--vae", str(files["vae"]), "-o", str(tmp_path / "o.mp4")])
    assert_clean_error(capsys, code, "cannot read latent file")
    assert not (tmp_path / "o.mp4").exists()


def test_missing_and_corrupt_vae(files, tmp_path, capsys):
    code = main(["decode", str(files["npy"]), "--vae", str(tmp_path / "none.pth"), "-o", str(tmp_path / "o.mp4")])
    assert_clean_error(capsys, code, "none.pth does not exist")
    (tmp_path / "bad.pth").write_bytes(b"\x80garbage")
    code = main(["decode", str(files["npy"]), "--vae", str(tmp_path / "bad.pth"), "-o", str(tmp_path / "o.mp4")])
    assert_clean_error(capsys, code, "cannot read")
    assert not (tmp_path / "o.mp4").exists()


def test_latents_that_do_not_fit_the_vae(files, tmp_path, capsys):
    np.save(tmp_path / "z48.npy", np.zeros((48, 3, 4, 4), np.float32))
    code = main(["decode", str(tmp_path / "z48.npy"), "--vae", str(files["vae"]), "-o", str(tmp_path / "o.mp4")])
    assert_clean_error(capsys, code, "48 channels", "takes 16")
    assert not (tmp_path / "o.mp4").exists()


def test_latent_file_with_several_tensors(files, tmp_path, capsys):
    save_file({"a": LATENTS.clone(), "b": LATENTS.clone()}, tmp_path / "two.safetensors")
    code = main(["decode", str(tmp_path / "two.safetensors"), "--vae", str(files["vae"]), "-o", str(tmp_path / "o.mp4")])
    assert_clean_error(capsys, code, "several tensors", "--key")
    assert main(["decode", str(tmp_path / "two.safetensors"), "--key", "b", "--vae", str(files["vae"]),
                 "-o", str(tmp_path / "o.mp4"), "--quiet"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--codec", "libnope"], ["unknown video encoder 'libnope'"]),
        (["--format", "flv"], ["unknown output format 'flv'"]),
        (["--crf", "20", "--preset", "nope"], ["cannot encode with libx264"]),
        (["--dtype", "int4"], ["unsupported dtype"]),
    ],
)
def test_bad_output_settings(files, tmp_path, capsys, args, fragments):
    out = tmp_path / "o.mp4"
    code = main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(out), *args])
    assert_clean_error(capsys, code, *fragments)
    assert not out.exists()


def test_unknown_extension(files, tmp_path, capsys):
    code = main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(tmp_path / "o.avi")])
    assert_clean_error(capsys, code, "cannot tell the container from the extension '.avi'")


def test_unwritable_paths(files, tmp_path, capsys):
    code = main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(tmp_path / "no" / "o.mp4")])
    assert_clean_error(capsys, code, "does not exist")
    code = main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(tmp_path)])
    assert_clean_error(capsys, code, "is a folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code = main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(locked / "o.mp4")])
        assert_clean_error(capsys, code, "no permission")


def test_existing_output_needs_overwrite(files, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"precious")
    code = main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(out)])
    assert_clean_error(capsys, code, "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    assert main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(out), "--overwrite", "--quiet"]) == 0
    assert len(decoded(out)) == 9


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "-o", str(out), "--latent-frames", "3", "--size", "6x8", "--quiet"]) == 0
    frames = decoded(out)
    assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
    code = main(["demo", "-o", str(tmp_path / "d.mp4"), "--size", "big"])
    assert_clean_error(capsys, code, "--size must be HEIGHTxWIDTH")
    code = main(["demo", "-o", str(tmp_path / "d.mp4"), "--width", "0"])
    assert_clean_error(capsys, code, "--width must be a positive number of channels")
    code = main(["demo", "-o", str(tmp_path / "d.mp4"), "--latent-frames", "0"])
    assert_clean_error(capsys, code, "at least one latent frame")
    assert not (tmp_path / "d.mp4").exists()


def test_tiled_decode_equals_untiled(files, tmp_path, expected_frames):
    out = tmp_path / "tiled.mkv"
    assert main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(out), "--codec", "ffv1",
                 "--tile", "2x3", "--quiet"]) == 0  # fmt: skip
    frames = decoded(out)
    assert len(frames) == 9 and all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(frames, expected_frames))


@pytest.mark.parametrize("args", [["--tile", "0"], ["--tile", "axb"], ["--fps", "fast"], ["--bogus"]])
def test_usage_errors_are_one_line(files, tmp_path, capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(tmp_path / "o.mp4"), *args])
    assert_clean_error(capsys, exit_info.value.code)


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_modes_from_the_command_line(files, tmp_path, expected_frames, mode):
    out = tmp_path / "off.mkv"
    assert main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(out), "--codec", "ffv1",
                 "--offload", mode, "--quiet"]) == 0  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(decoded(out), expected_frames))


def test_out_of_memory_says_what_to_try(files, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(streamdec.stream, "decode_to_file", out_of_memory)
    code = main(["decode", str(files["npy"]), "--vae", str(files["vae"]), "-o", str(tmp_path / "o.mp4")])
    assert_clean_error(capsys, code, "the device ran out of memory (CUDA out of memory.", "try --max-vram GIB")
