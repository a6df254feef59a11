"""Every row of docs/faults.md, run as it is written there: bad files, bad flags, signals, closed and
full outputs, pipes. The table is the specification; this module only reads and runs it."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streamdec.cli import main

from helpers.wan import official_state_dict

TABLE = Path(__file__).parents[1] / "docs" / "faults.md"
SHELL = re.compile(r"[&|;<>()]")  # commands with these run in bash
# job control: a background command keeps SIGINT (bash ignores it there otherwise, as for `cmd &` in scripts)
PRELUDE = """set -m
wait_for_bytes() {  # FILE N: until FILE holds N bytes (at most 120 s)
  for _ in $(seq 2400); do [ -f "$1" ] && [ "$(stat -c %s "$1")" -ge "$2" ] && return 0; sleep 0.05; done
  echo "wait_for_bytes: $1 never reached $2 bytes" >&2; return 1
}
"""


def read_table() -> list[dict]:
    rows = []
    for line in TABLE.read_text().splitlines():
        if not re.match(r"\|\s*\d+\s*\|", line):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        number, case, command, code, says, left = cells
        rows.append(dict(number=int(number), case=case, command=command.strip("`"), exit=int(code),
                         says=says.strip("`"), left=[] if left == "-" else [t.strip() for t in left.split(",")]))  # fmt: skip
    return rows


ROWS = read_table()


class Evil:
    """Unpickling this runs a command: streamdec must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(checkpoints, wan_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    z = torch.randn(16, 3, 5, 7, generator=torch.Generator().manual_seed(61))
    paths = {"VAE": checkpoints["official-pth"], "PAYLOAD": root / "pwned"}

    def put(name: str, filename: str, write) -> None:
        paths[name] = root / filename
        write(paths[name])

    put("Z", "z.npy", lambda p: np.save(p, z.numpy()))
    put("LONG", "long.npy", lambda p: np.save(p, torch.randn(16, 400, 5, 7).numpy()))
    put("Z48", "z48.npy", lambda p: np.save(p, np.zeros((48, 3, 5, 7), np.float32)))
    put("ZNAN", "znan.npy", lambda p: np.save(p, np.full((16, 2, 5, 7), np.nan, np.float32)))
    put("ZTWO", "two.safetensors", lambda p: save_file({"a": z.clone(), "b": z.clone()}, p))
    put("Z3D", "z3d.npy", lambda p: np.save(p, np.zeros((16, 5, 7), np.float32)))
    put("ZINT", "zint.npy", lambda p: np.save(p, np.zeros((16, 2, 5, 7), np.int32)))
    put("ZTXT", "z.txt", lambda p: p.write_text("0.1 0.2"))
    put("CORRUPT_ST", "corrupt.safetensors", lambda p: p.write_bytes(b"\x00garbage" * 50))
    put("CORRUPT_PTH", "corrupt.pth", lambda p: p.write_bytes(b"\x80garbage" * 50))
    put("TEXT_PT", "notes.pt", lambda p: p.write_text("these are not latents\n"))
    put("TEXT_PTH", "notes.pth", lambda p: p.write_text("these are not weights\n"))
    put("PNG_PT", "image.pt", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)))
    put("HTML_PTH", "vae.pth", lambda p: p.write_text("<!DOCTYPE html><html><body>Not Found</body></html>"))
    put("EVIL_PT", "evil.pt", lambda p: torch.save({"weights": Evil(paths["PAYLOAD"])}, p))
    put("NOT_VAE", "unet.safetensors", lambda p: save_file({"conv.weight": torch.zeros(4, 4)}, p))
    broken = official_state_dict(wan_model)
    del broken["decoder.head.2.bias"]
    put("VAE_BROKEN", "broken.pth", lambda p: torch.save(broken, p))
    put("EMPTY_DIR", "empty", lambda p: p.mkdir())
    return paths


def play(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def default_sigint() -> None:
    """SIGINT as a terminal delivers it, even when the tests run where it is ignored (a background
    job, nohup): an ignored signal stays ignored in every program started below."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_row(row: dict, env: dict) -> tuple[int, str]:
    """Run the row's command; its exit status and stderr."""
    command = row["command"]
    if SHELL.search(command):
        bash_env = {**os.environ, **env, "SD": f"{shlex.quote(sys.executable)} -m streamdec"}
        proc = subprocess.run(["bash", "-c", PRELUDE + command], env=bash_env, capture_output=True,
                              timeout=300, cwd=env["DIR"], preexec_fn=default_sigint)  # fmt: skip
        # bash's own reports on its jobs ("[1]+ Exit 143 ...", "bash: line 6: 2207 Killed ...")
        job_notices = re.compile(r"^(\[\d+\][+-]? |bash: line \d+: +\d+ ).*$\n?", re.MULTILINE)
        return proc.returncode, job_notices.sub("", proc.stderr.decode())
    argv = shlex.split(re.sub(r"\$(\w+)", lambda m: env[m.group(1)] if m.group(1) != "SD" else "SD", command))
    assert argv[0] == "SD", command
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = main(argv[1:])
        except SystemExit as exit_:  # usage errors
            code = exit_.code
    return code, err.getvalue()


def check_left(token: str, folder: Path, env: dict) -> None:
    name, _, what = token.partition(" ")
    path = Path(name) if name.startswith("/") else folder / name
    if what == "absent":
        assert not path.exists() and not path.is_symlink(), f"{path} exists"
    elif what == "unchanged":
        assert path.read_bytes() == b"precious", f"{path} was changed"
    elif what.startswith("playable"):
        frames = play(path)
        expected = what.split()[1:]
        assert frames >= 1 and (not expected or frames == int(expected[0])), f"{path}: {frames} frames"
    elif what == "symlink":
        assert path.is_symlink()
    elif what == "device":
        assert stat.S_ISCHR(os.stat(path).st_mode), f"{path} is no longer a device"
    elif what == "fifo":
        assert stat.S_ISFIFO(os.stat(path).st_mode), f"{path} is no longer a named pipe"
    elif name == "payload":
        assert not Path(env["PAYLOAD"]).exists(), "the malicious pickle ran"
    else:
        raise AssertionError(f"unknown check {token!r} in docs/faults.md")


def test_the_table_has_the_cases_it_promises():
    assert len(ROWS) >= 40 and [r["number"] for r in ROWS] == list(range(1, len(ROWS) + 1))


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['number']}-{r['case']}" for r in ROWS])
def test_row(row, files, tmp_path):
    if "(no GPU)" in row["case"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "out.mp4").write_bytes(b"precious")
    env = {name: str(path) for name, path in files.items()} | {"DIR": str(tmp_path)}
    code, err = run_row(row, env)
    assert code == row["exit"], f"exit {code}, expected {row['exit']}; stderr: {err}"
    assert "Traceback" not in err, err
    says = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], row["says"])
    if says:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("streamdec: "), f"not one line: {err!r}"
        assert says in lines[0], f"{says!r} not in {lines[0]!r}"
    elif code not in (0,):
        assert err.strip() == "", f"expected no message: {err!r}"
    assert not list(tmp_path.glob(".*.partial")), "a temporary file was left behind"
    for token in row["left"]:
        check_left(token, tmp_path, env)
