"""The Hugging Face hub: repo ids, snapshot downloads of what a pipeline needs, and the converted-copy cache.

A hub model is converted once to the MLX layout and cached under $ZIMAGE_MLX_CACHE (default ~/.cache/zimage_mlx),
keyed by repo, revision, dtype and bits, so later starts skip the conversion; offline, with the snapshot gone,
that copy still serves. Downloads use `huggingface_hub.snapshot_download` with `allow_patterns` (only the files a
pipeline needs) and honour HF_HUB_OFFLINE.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .components import MANIFEST_NAME, MODEL_COMPONENTS, is_mlx_dir, read_manifest
from .download import DownloadPlan, converted_size, diffusers_files, mlx_files, remote_files, verify_snapshot
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


def resolve_source(src: str | Path, revision: str | None = None, offline: bool | None = None, *,
                   convert_into: Path | None = None, dtype: mx.Dtype | None = None, quantize=None,
                   log: Callable[[str], None] | None = None) -> Path:
    """A local directory for `src`: the directory itself, or a hub snapshot.

    A hub repository published in the MLX layout (it holds zimage_mlx.json) is fetched as the manifest lists it —
    exactly its files, from the commit the manifest came from, checked against its sizes and sha256s — and loads
    as saved. Otherwise the diffusers tree: only what a pipeline needs (HUB_ALLOW_PATTERNS). Before any weight
    file is fetched the download plan is printed (`log`, default stderr) and checked against the free disk space,
    counting the converted copy the caller will write into `convert_into` (sized for `dtype` and `quantize`).
    Offline (HF_HUB_OFFLINE=1 or offline=True) the cached snapshot is used; nothing cached raises WeightError.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightError(f"{path}: expected a model directory, got a file (single files go through convert)")
    if not looks_like_repo_id(str(src)):
        raise WeightError(f"{src}: no such directory, and not a hub id like {DEFAULT_REPO}")
    import huggingface_hub
    from huggingface_hub import constants

    repo = str(src)
    info = None
    if not (constants.HF_HUB_OFFLINE if offline is None else offline):
        info = _metadata(repo, revision, repo, "pass a local directory")
    if info is None:          # offline, or no network: the cached snapshot as it is (as huggingface_hub does)
        root = _download(lambda: huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True),
                         repo, repo, "pass a local directory", revision=revision)
        if is_mlx_dir(root):
            verify_snapshot(root, read_manifest(root), label=repo)
        return root
    log = log or _stderr
    sha, remote = info.sha, remote_files(info)
    if MANIFEST_NAME in remote:
        manifest_file = _download(lambda: huggingface_hub.hf_hub_download(repo, MANIFEST_NAME, revision=sha),
                                  repo, repo, "pass a local directory", filename=MANIFEST_NAME)
        manifest = read_manifest(manifest_file.parent)
        plan = DownloadPlan(repo, sha, mlx_files(repo, manifest, remote))
    else:
        plan = DownloadPlan(repo, sha, diffusers_files(repo, remote, HUB_ALLOW_PATTERNS))
        if convert_into is not None:
            configs = {}
            for part in MODEL_COMPONENTS:
                f = _download(lambda: huggingface_hub.hf_hub_download(repo, f"{part}/config.json", revision=sha),
                              repo, repo, "pass a local directory", filename=f"{part}/config.json")
                configs[part] = json.loads(f.read_text())
            plan.converted_bytes = converted_size(configs, dtype or mx.bfloat16, quantize)
            plan.convert_into = Path(convert_into)
    plan.cached = {f.name for f in plan.files
                   if isinstance(huggingface_hub.try_to_load_from_cache(repo, f.name, revision=sha), str)}
    if plan.fetch_bytes:      # (all cached: nothing to announce, nothing to refuse)
        log(plan.summary())
        plan.check_space(Path(constants.HF_HUB_CACHE))
    root = _download(lambda: huggingface_hub.snapshot_download(repo, revision=sha,
                                                               allow_patterns=[f.name for f in plan.files]),
                     repo, repo, "pass a local directory", revision=revision)
    _remember_ref(root, revision or "main", sha)
    if MANIFEST_NAME in remote:
        verify_snapshot(root, read_manifest(root), remote, label=repo)
    return root


def _remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Point the cache's refs/<branch> at the commit fetched (as huggingface_hub does for a branch download), so
    the pinned snapshot is found offline later."""
    refs = snapshot.parent.parent / "refs"
    if snapshot.parent.name != "snapshots" or revision == sha or "/" in revision:
        return
    refs.mkdir(exist_ok=True)
    tmp = refs / f".{revision}.{os.getpid()}"
    tmp.write_text(sha)
    os.replace(tmp, refs / revision)


def resolve_file(spec: str | Path, offline: bool | None = None, log: Callable[[str], None] | None = None) -> Path:
    """A local file for `spec`: the path itself, or a hub file "owner/repo/path/in/repo" (hf_hub_download, cached
    by huggingface_hub; HF_HUB_OFFLINE honoured). Used for every weights file: model single files for convert,
    LoRAs, ControlNets, training adapters, the TAEF1 preview decoder. Online, a file not yet cached is announced
    with its size and checked against the free disk space before it is fetched."""
    path = Path(spec).expanduser()
    if path.exists() or len(str(spec).split("/")) < 3 or str(spec).startswith((".", "/", "~")):
        return path
    import huggingface_hub
    from huggingface_hub import constants

    owner, repo, filename = str(spec).split("/", 2)
    repo = f"{owner}/{repo}"
    local_only = constants.HF_HUB_OFFLINE if offline is None else offline
    cached = isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str)
    info = None if local_only or cached else _metadata(repo, None, str(spec), "pass a local path", filename)
    if info is not None:      # (None without network: hf_hub_download then says what is wrong)
        remote = remote_files(info)
        if filename not in remote:
            raise WeightError(f"{spec}: the hub repository has no file {filename}")
        plan = DownloadPlan(repo, info.sha, [remote[filename]])
        (log or _stderr)(plan.summary())
        plan.check_space(Path(constants.HF_HUB_CACHE))
    return _download(lambda: huggingface_hub.hf_hub_download(repo, filename, local_files_only=local_only),
                     str(spec), repo, "pass a local path", filename=filename)


def _metadata(repo: str, revision: str | None, spec: str, fix: str, filename: str | None = None):
    """The repository's file listing with sizes (`HfApi.model_info`), or None when the network is unreachable;
    the hub's own refusals (missing, gated, no such revision) are one WeightError line as for downloads."""
    import huggingface_hub

    def fetch():
        try:
            return huggingface_hub.HfApi().model_info(repo, revision=revision, files_metadata=True)
        except Exception as e:
            if isinstance(e, (ConnectionError, TimeoutError)) or \
                    type(e).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):
                return None
            raise

    return _download(fetch, spec, repo, fix, revision=revision, filename=filename, as_path=False)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _download(fetch, spec: str, repo: str, fix: str, revision: str | None = None, filename: str | None = None,
              as_path: bool = True):
    """Run a huggingface_hub download of (a file of) `repo`; each of its failures becomes one WeightError line naming
    `spec` and the way out (`fix` being the local alternative)."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        result = fetch()
        return Path(result) if as_path else result
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
