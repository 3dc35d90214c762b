"""The Hugging Face hub: repo ids, snapshot downloads of what a pipeline needs, and the converted-copy cache.

A hub model is converted once to the MLX layout and cached under $ZIMAGE_MLX_CACHE (default ~/.cache/zimage_mlx),
keyed by repo, revision, dtype and bits, so later starts skip the conversion; offline, with the snapshot gone,
that copy still serves. Downloads use `huggingface_hub.snapshot_download` with `allow_patterns` (only the files a
pipeline needs) and honour HF_HUB_OFFLINE.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from .components import is_mlx_dir
from .weights import WeightError, dtype_name

DEFAULT_REPO = "Tongyi-MAI/Z-Image-Turbo"
# What a pipeline needs from a diffusers-layout repo (no .bin/.pt duplicates, no README images).
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
]


def looks_like_repo_id(src: str) -> bool:
    parts = str(src).split("/")
    return len(parts) == 2 and all(parts) and not str(src).startswith((".", "~")) and not Path(src).exists()


def resolve_source(src: str | Path, revision: str | None = None, offline: bool | None = None) -> Path:
    """A local directory for `src`: the directory itself, or a hub snapshot (downloading only what is needed).

    Offline (HF_HUB_OFFLINE=1 or offline=True) with nothing cached raises WeightError with the fix.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightError(f"{path}: expected a model directory, got a file (single files go through convert)")
    if not looks_like_repo_id(str(src)):
        raise WeightError(f"{src}: no such directory, and not a hub id like {DEFAULT_REPO}")
    from huggingface_hub import constants, snapshot_download

    local_only = constants.HF_HUB_OFFLINE if offline is None else offline
    return _download(lambda: snapshot_download(str(src), revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                               local_files_only=local_only),
                     str(src), str(src), "pass a local directory", revision=revision)


def resolve_file(spec: str | Path, offline: bool | None = None) -> Path:
    """A local file for `spec`: the path itself, or a hub file "owner/repo/path/in/repo" (hf_hub_download, cached
    by huggingface_hub; HF_HUB_OFFLINE honoured). Used for LoRAs."""
    path = Path(spec).expanduser()
    if path.exists() or len(str(spec).split("/")) < 3 or str(spec).startswith((".", "/", "~")):
        return path
    from huggingface_hub import constants, hf_hub_download

    owner, repo, filename = str(spec).split("/", 2)
    local_only = constants.HF_HUB_OFFLINE if offline is None else offline
    return _download(lambda: hf_hub_download(f"{owner}/{repo}", filename, local_files_only=local_only),
                     str(spec), f"{owner}/{repo}", "pass a local path", filename=filename)


def _download(fetch, spec: str, repo: str, fix: str, revision: str | None = None, filename: str | None = None) -> Path:
    """Run a huggingface_hub download of (a file of) `repo`; each of its failures becomes one WeightError line naming
    `spec` and the way out (`fix` being the local alternative)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(fetch())
    except LocalEntryNotFoundError:      # before OSError and EntryNotFoundError, which it also is
        why = ("not a local path, and not in the local Hugging Face cache with downloading off (offline or no "
               f"network): download it once online (`hf download {repo}`), or {fix}")
    except GatedRepoError:               # before RepositoryNotFoundError, which it also is
        why = "gated repository; accept its licence on the hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        why = f"no such repository on the hub (or it is private); or {fix}"
    except RevisionNotFoundError:
        why = f"revision {revision!r} not found on the hub"
    except EntryNotFoundError:
        why = f"the hub repository has no file {filename}"
    except OSError as e:
        why = f"download failed ({e}); check the network or {fix}"
    raise WeightError(f"{spec}: {why}")


def download_tokenizer(repo: str = DEFAULT_REPO) -> Path:
    """The Qwen3 tokenizer files of the Z-Image hub repo (a small download; cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=["tokenizer/*"])) / "tokenizer"
    except (LocalEntryNotFoundError, OSError):
        raise WeightError("single files carry no tokenizer and it could not be downloaded; pass --tokenizer DIR "
                          f"(the tokenizer/ folder of {repo})") from None


def cache_root() -> Path:
    return Path(os.environ.get("ZIMAGE_MLX_CACHE", Path.home() / ".cache" / "zimage_mlx"))


def _cache_prefix(repo: str) -> str:
    return repo.replace("/", "--") + "--"


def cache_dir(repo: str, snapshot: Path, dtype: mx.Dtype, bits: dict) -> Path:
    """Where the converted MLX copy of a hub snapshot lives: keyed by repo, revision, dtype and bits."""
    revision = snapshot.name if snapshot.parent.name == "snapshots" else "local"

    def b(n):
        return f"{bits[n]}bit" if bits.get(n) else "float"

    return cache_root() / (f"{_cache_prefix(repo)}{revision[:12]}--{dtype_name(dtype)}"
                           f"--dit-{b('transformer')}--te-{b('text_encoder')}")


def find_cached(repo: str, revision: str | None, dtype: mx.Dtype | None) -> Path | None:
    """The newest converted copy of `repo` in the cache (matching revision and dtype when given)."""
    pattern = _cache_prefix(repo) + ((revision or "")[:12] or "*") + "--"
    pattern += f"{dtype_name(dtype)}--*" if dtype is not None else "*"
    found = [p for p in cache_root().glob(pattern) if is_mlx_dir(p)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
