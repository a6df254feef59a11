"""Hugging Face Hub ids as VAE sources: `load_vae("Wan-AI/Wan2.1-T2V-14B")` fetches the VAE's files and
nothing else, through huggingface_hub, so its cache, `HF_HUB_OFFLINE`, `HF_HOME` and tokens apply.

Which files are the VAE's: a `subfolder` if given (a folder, or a file's path in the repository);
else a diffusers repository's `vae/` folder (config.json beside the weights), a VAE-only repository's
root folder, or the one checkpoint file whose name says VAE (official repositories ship
`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, ...). Offline, the cached snapshot is searched instead of the
repository's listing.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import StreamdecError, one_line

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHTS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


class HubError(StreamdecError):
    """A Hub id that cannot be resolved to a VAE; the message says why and what to try."""


def is_hub_id(src) -> bool:
    """`org/name` that is not a path on this machine."""
    return isinstance(src, str) and HUB_ID.fullmatch(src) is not None and not Path(src).exists()


def fetch_vae(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local path (folder or file) of the VAE in Hub repository `repo_id`, downloaded if needed."""
    from huggingface_hub import hf_hub_download, snapshot_download

    files = _listing(repo_id, revision)
    folder, single = _choose(repo_id, files, subfolder)
    try:
        if single is not None:
            return Path(hf_hub_download(repo_id, single, revision=revision))
        prefix = f"{folder}/" if folder else ""
        wanted = [f for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]
                  and (f.endswith(WEIGHTS) or f.endswith(".json"))]  # fmt: skip
        root = snapshot_download(repo_id, revision=revision, allow_patterns=wanted)
        return Path(root) / folder if folder else Path(root)
    except Exception as err:
        raise HubError(f"cannot fetch the VAE of {repo_id} from the Hugging Face Hub: {_reason(err)}") from None


def _listing(repo_id: str, revision: str | None) -> list[str]:
    """The repository's files: from the Hub, or, offline or unreachable, from the cached snapshot."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:
        raise HubError(f"{repo_id} {_reason(err)}; check the id (and HF_TOKEN for a private or gated one)") from None
    except Exception as online:  # offline (HF_HUB_OFFLINE), no network: what the cache holds
        try:
            root = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:
            raise HubError(f"cannot reach the Hugging Face Hub for {repo_id} ({_reason(online)}) and it is not in "
                           "the local cache; connect, or give a local path") from None  # fmt: skip
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _choose(repo_id: str, files: list[str], subfolder: str | None) -> tuple[str | None, str | None]:
    """(folder, None) for a diffusers-style folder, (None, file) for a single checkpoint file."""
    if subfolder:
        subfolder = subfolder.strip("/")
        if subfolder in files:
            return None, subfolder
        if any(f.startswith(subfolder + "/") for f in files):
            return subfolder, None
        raise HubError(f"{repo_id} has no {subfolder!r}; it has: {_sample(files)}")
    if "vae/config.json" in files:
        return "vae", None
    if "config.json" in files and any("/" not in f and f.endswith(WEIGHTS) for f in files):
        return "", None
    named = [f for f in files if f.endswith(WEIGHTS) and "vae" in f.rsplit("/", 1)[-1].lower()]
    if len(named) == 1:
        return None, named[0]
    if named:
        raise HubError(f"{repo_id} holds several VAE files ({_sample(named)}); choose one with subfolder (--subfolder)")
    raise HubError(f"found no VAE in {repo_id} (no vae/ folder, no *vae* checkpoint); it has: {_sample(files)}; "
                   "give its path in the repository with subfolder (--subfolder)")  # fmt: skip


def _sample(files: list[str]) -> str:
    return ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "") if files else "no files"


def _reason(err: BaseException) -> str:
    name = type(err).__name__
    if name == "RepositoryNotFoundError":
        return "is not a repository on the Hub (or it is private)"
    if name == "RevisionNotFoundError":
        return "has no such revision"
    if name == "GatedRepoError":
        return "is gated: accept its conditions on the Hub and log in (hf auth login) or set HF_TOKEN"
    return one_line(err)
