"""What a hub download will fetch, whether it fits on disk, and whether what arrived is what the manifest lists.

The plan is made from the hub's file metadata (`HfApi.model_info(files_metadata=True)`: names, sizes, LFS
sha256s) before any weight file is fetched: the files and gigabytes to download (those already in the Hugging
Face cache are not counted), the converted copy a diffusers tree turns into (sized with memory.py's accounting),
and the free space of the disk(s) that receive them. A plan that does not fit is refused up front, so the cache is
never left half filled. docs/hub.md describes the flow.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..memory import component_weight_bytes, plan_memory
from .components import MANIFEST_NAME, MODEL_COMPONENTS
from .quantize import parse_quantize
from .weights import WeightError

MLX_SMALL_FILES = ("tokenizer/*", "scheduler/*.json", "*/config.json", "*/model.safetensors.index.json")


@dataclass(frozen=True)
class RemoteFile:
    name: str                  # path in the repository
    size: int | None           # bytes, from the hub's metadata
    sha256: str | None = None  # the LFS sha256 (large files), from the hub's metadata


@dataclass
class DownloadPlan:
    repo: str
    revision: str                                   # the commit everything is fetched from
    files: list[RemoteFile]
    cached: set[str] = field(default_factory=set)   # names already in the Hugging Face cache
    converted_bytes: int = 0                        # the MLX copy written after the download (0: none)
    convert_into: Path | None = None

    @property
    def fetch_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if f.name not in self.cached)

    def summary(self) -> str:
        """The lines printed before anything is fetched."""
        gb = 1e9
        todo = [f for f in self.files if f.name not in self.cached]
        cached = f" ({len(self.files) - len(todo)} already cached)" if len(todo) < len(self.files) else ""
        lines = [f"download plan for {self.repo} @ {self.revision[:12]}: {len(todo)} files, "
                 f"{self.fetch_bytes / gb:.2f} GB to fetch{cached}"]
        lines += [f"  {f.name}  {(f.size or 0) / gb:.2f} GB" for f in sorted(todo, key=lambda f: -(f.size or 0))[:12]]
        if len(todo) > 12:
            lines.append(f"  … and {len(todo) - 12} small files")
        if self.converted_bytes:
            lines.append(f"  then a converted MLX copy of {self.converted_bytes / gb:.2f} GB in {self.convert_into}")
        return "\n".join(lines)

    def check_space(self, cache: Path) -> None:
        """Refuse (WeightError with the numbers) when the download and the converted copy cannot fit."""
        needs: dict[int, list] = {}
        for where, nbytes in ((cache, self.fetch_bytes), (self.convert_into, self.converted_bytes)):
            if where is None or not nbytes:
                continue
            existing = existing_parent(where)
            entry = needs.setdefault(os.stat(existing).st_dev, [existing, 0])
            entry[1] += nbytes
        for existing, nbytes in needs.values():
            free = free_bytes(existing)
            if nbytes > free:
                raise WeightError(
                    f"{self.repo}: not enough disk space: the download plan needs {nbytes / 1e9:.2f} GB "
                    f"({self.fetch_bytes / 1e9:.2f} GB to download"
                    + (f" + {self.converted_bytes / 1e9:.2f} GB converted copy" if self.converted_bytes else "")
                    + f") on the disk of {existing}, which has {free / 1e9:.2f} GB free; free some space, set "
                    "HF_HOME / ZIMAGE_MLX_CACHE to a larger disk, or choose a published quantized MLX repo")


def existing_parent(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# --------------------------------------------------------------------------- the repository's files
def remote_files(info) -> dict[str, RemoteFile]:
    """{name: RemoteFile} from a `model_info(files_metadata=True)` answer."""
    out = {}
    for s in info.siblings or ():
        lfs = getattr(s, "lfs", None)
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        size = getattr(s, "size", None)
        if size is None and lfs is not None:
            size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
        out[s.rfilename] = RemoteFile(s.rfilename, size, sha)
    return out


def matching(remote: dict[str, RemoteFile], patterns) -> list[RemoteFile]:
    return [f for n, f in remote.items() if any(fnmatch.fnmatch(n, p) for p in patterns)]


def diffusers_files(repo: str, remote: dict[str, RemoteFile], patterns) -> list[RemoteFile]:
    """The files of a diffusers tree a pipeline needs; a repository that is neither layout is refused, naming
    what is missing."""
    missing = [f"{part}/ weights" for part in MODEL_COMPONENTS
               if not any(n.startswith(f"{part}/") and n.endswith(".safetensors") for n in remote)]
    missing += [] if any(n.startswith("tokenizer/") for n in remote) else ["tokenizer/"]
    if missing:
        raise WeightError(f"{repo}: neither a zimage_mlx repository (no {MANIFEST_NAME}) nor a diffusers Z-Image "
                          f"tree (no {', '.join(missing)}); pass a repo made by `zimage-mlx upload` or with the "
                          "layout of Tongyi-MAI/Z-Image-Turbo")
    return matching(remote, patterns)


def manifest_files(manifest: dict) -> dict[str, dict]:
    """{path: {"bytes", "sha256"}} of every file an MLX-layout directory holds, from its manifest: the inventory
    convert writes ("files"), else the component shards it names (sizes unknown)."""
    listed = dict(manifest.get("files") or {})
    for name in MODEL_COMPONENTS:
        for shard in manifest["components"][name].get("files") or ():
            listed.setdefault(f"{name}/{shard}", {})
    return listed


def mlx_files(repo: str, manifest: dict, remote: dict[str, RemoteFile]) -> list[RemoteFile]:
    """Exactly the files the manifest lists (plus configs, tokenizer, scheduler); one it lists that the repository
    lacks is an error naming it."""
    listed = manifest_files(manifest)
    absent = [n for n in listed if n not in remote]
    if absent:
        raise WeightError(f"{repo}: the manifest lists {absent[0]}, which the repository does not hold "
                          f"({len(absent)} file(s) missing); the upload is incomplete")
    names = set(listed) | {f.name for f in matching(remote, MLX_SMALL_FILES)} | {MANIFEST_NAME}
    return [remote[n] for n in sorted(names) if n in remote]


def converted_size(configs: dict, dtype: mx.Dtype, quantize) -> int:
    """Bytes of the MLX copy of a diffusers tree (memory.py's accounting; "auto" as this machine would plan it)."""
    bits = parse_quantize(quantize)
    if bits == "auto":
        try:
            bits = plan_memory(configs, dtype, "auto").bits
        except MemoryError:
            bits = {"transformer": 4, "text_encoder": 4}
    return sum(component_weight_bytes(n, configs[n], dtype, bits.get(n), 64) for n in MODEL_COMPONENTS)


# --------------------------------------------------------------------------- checking what arrived
def file_sha256(path: Path) -> str:
    """sha256 of a file; for a Hugging Face cache symlink the blob name already is it (no re-read)."""
    target = Path(os.path.realpath(path))
    if re.fullmatch(r"[0-9a-f]{64}", target.name) and target.parent.name == "blobs":
        return target.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_snapshot(root: Path, manifest: dict, remote: dict[str, RemoteFile] | None = None,
                    label: str | None = None) -> None:
    """Every file the manifest lists is present with its size and sha256 (from the manifest's inventory, else the
    hub's metadata); the first that is not is an error naming it, before anything loads."""
    label = label or str(root)
    for name, want in manifest_files(manifest).items():
        path = root / name
        meta = (remote or {}).get(name)
        size = want.get("bytes", meta.size if meta else None)
        sha = (want.get("sha256") or "").removeprefix("sha256:") or (meta.sha256 if meta else None)
        if not path.is_file():
            raise WeightError(f"{label}: {name} is missing from the snapshot (an interrupted download?); run again "
                              "online to complete it")
        if size is not None and path.stat().st_size != size:
            raise WeightError(f"{label}: {name} has {path.stat().st_size} bytes, the manifest says {size}: an "
                              "incomplete or corrupt download; delete it from the cache (`hf cache delete`) and "
                              "run again")
        if sha and file_sha256(path) != sha:
            raise WeightError(f"{label}: {name} has a sha256 that differs from the manifest's ({sha[:12]}…): a "
                              "corrupt download or a modified file; delete it from the cache (`hf cache delete`) "
                              "and run again")


def inventory(root: Path, hashes: bool = True) -> dict[str, dict]:
    """{path: {"bytes", "sha256"}} of every file under an MLX-layout directory except the manifest and README."""
    out = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name in (MANIFEST_NAME, "README.md") or name.startswith("."):
            continue
        out[name] = {"bytes": path.stat().st_size, **({"sha256": file_sha256(path)} if hashes else {})}
    return out
