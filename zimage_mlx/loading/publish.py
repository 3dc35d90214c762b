"""Publish an MLX-layout directory (written by `zimage-mlx convert`) as a Hugging Face model repository.

`upload(DIR, "owner/repo")` checks that DIR loads (manifest, every component's keys and shapes), completes the
manifest's file inventory with sha256s (what `hub.resolve_source` checks a download against), writes a model card
(README.md: YAML front matter for the hub, bits per component, disk size, predicted peak memory, source hashes,
usage) and sends the folder with `HfApi.upload_folder`. docs/hub.md describes publishing and loading.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..memory import predict_stages
from .components import MANIFEST_NAME, MODEL_COMPONENTS, load_component, read_manifest
from .download import inventory
from .hub import DEFAULT_REPO, looks_like_repo_id
from .quantize import describe_bits
from .weights import WeightError, parse_dtype, read_config

CARD_SIZES = (512, 1024, 1536)
KNOWN_LICENSES = {"Tongyi-MAI/Z-Image-Turbo": "apache-2.0", "Tongyi-MAI/Z-Image": "apache-2.0"}
TAGS = ("mlx", "z-image", "text-to-image")


class PublishError(WeightError):
    """A directory or destination that cannot be published (one line naming what and the way out)."""


# --------------------------------------------------------------------------- checking the directory
def check_loads(root: Path) -> dict:
    """The manifest of `root`, after every component was built and filled from its files (keys, shapes, dtypes
    and quantization as saved); raises WeightError naming the first thing that does not load."""
    root = Path(root)
    if not (root / MANIFEST_NAME).is_file():
        raise PublishError(f"{root}: not a zimage_mlx directory (no {MANIFEST_NAME}); make one with "
                           "`zimage-mlx convert`")
    manifest = read_manifest(root)
    for name in MODEL_COMPONENTS:
        load_component(name, root / name, saved=manifest["components"][name])
        mx.clear_cache()
    if not (root / "tokenizer" / "tokenizer.json").is_file():
        raise PublishError(f"{root}: no tokenizer/tokenizer.json; convert the model again")
    return manifest


def complete_manifest(root: Path, manifest: dict) -> dict:
    """The manifest with an inventory of every file (bytes and sha256), rewritten atomically when it changed."""
    files = inventory(root, hashes=True)
    if manifest.get("files") == files:
        return manifest
    manifest = {**manifest, "files": files}
    _write_atomic(root / MANIFEST_NAME, json.dumps(manifest, indent=2))
    return manifest


# --------------------------------------------------------------------------- the model card
def base_model(manifest: dict) -> str:
    source = (manifest.get("source") or {}).get("source")
    if source and looks_like_repo_id(source):
        return source
    return DEFAULT_REPO if manifest.get("variant", "turbo") == "turbo" else "Tongyi-MAI/Z-Image"


def source_license(base: str, fetch_card: Callable[[str], str | None] | None = None) -> str:
    """The base model's licence: its card's `license:` (fetched from the hub when possible), else the known one."""
    text = fetch_card(base) if fetch_card is not None else None
    for line in (text or "").split("---")[1].splitlines() if text and text.startswith("---") else ():
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return KNOWN_LICENSES.get(base, "other")


def peak_memory(root: Path, manifest: dict, sizes=CARD_SIZES) -> dict[int, float]:
    """{side: predicted peak GB} for one side x side image on an Apple GPU, as saved (memory.py's planner)."""
    configs = {n: read_config(root / n) for n in MODEL_COMPONENTS}
    comps = manifest["components"]
    dtype = parse_dtype(comps["transformer"]["dtype"])
    bits = {n: comps[n].get("bits") for n in ("transformer", "text_encoder")}
    group = comps["transformer"].get("group_size") or comps["text_encoder"].get("group_size") or 64
    out = {}
    for side in sizes:
        st = predict_stages(configs, dtype, bits, group, side, side, cpu=False)
        out[side] = max(st["encode"], st["denoise"], st["decode"]) / 1e9
    return out


def model_card(root: Path, repo_id: str, manifest: dict, license: str, peaks: dict[int, float]) -> str:
    """README.md for the hub: YAML front matter (base model, licence, library, tags), then what the repo holds."""
    comps = manifest["components"]
    base = base_model(manifest)
    files = manifest.get("files") or {}
    disk = sum(f["bytes"] for f in files.values())
    rows = "\n".join(f"| {n} | {comps[n]['dtype']} | {_bits_label(comps[n].get('bits'))} | "
                     f"{comps[n].get('bytes', 0) / 1e9:.2f} GB |" for n in MODEL_COMPONENTS)
    hashes = (manifest.get("source") or {}).get("files") or {}
    sources = "\n".join(f"- `{name}`: `{sha}`" for name, sha in sorted(hashes.items())) or "- (not recorded)"
    peak_rows = "\n".join(f"| {s}x{s} | {gb:.1f} GB |" for s, gb in peaks.items())
    variant = manifest.get("variant", "turbo")
    steps = "" if variant == "turbo" else ", num_inference_steps=50, guidance_scale=4.0"
    return f"""---
base_model: {base}
license: {license}
library_name: zimage-mlx
pipeline_tag: text-to-image
tags:
{chr(10).join(f'- {t}' for t in TAGS)}
---

# {repo_id.split('/')[-1]}

[{base}](https://huggingface.co/{base}) (Z-Image {variant.capitalize()}) converted to the MLX layout of
[zimage-mlx](https://pypi.org/project/zimage-mlx/) for Apple Silicon: it loads as saved, with no conversion.
Quantization: {describe_bits({n: comps[n].get('bits') for n in ('transformer', 'text_encoder')})}.

| component | dtype | bits | size |
|---|---|---|---|
{rows}

Download and disk size: {disk / 1e9:.2f} GB ({len(files)} files, sizes and sha256s in `{MANIFEST_NAME}`).

Predicted peak memory on an Apple GPU, one image (zimage-mlx's planner):

| size | peak |
|---|---|
{peak_rows}

## Usage

```python
from zimage_mlx import ZImagePipeline
pipe = ZImagePipeline.from_pretrained("{repo_id}")
pipe(prompt="a red fox in the snow, golden hour"{steps}).images[0].save("fox.png")
```

or `zimage-mlx generate "a red fox in the snow" --model {repo_id}`.

## Source

Converted by zimage-mlx {manifest.get('zimage_mlx_version', '?')} from `{(manifest.get('source') or {}).get('source')}`
({(manifest.get('source') or {}).get('kind', '?')} layout); sha256 of the source files:

{sources}
"""


def write_card(root: Path, repo_id: str, fetch_card: Callable[[str], str | None] | None = None) -> Path:
    """Check `root` loads, complete its manifest's inventory and write README.md (atomically)."""
    manifest = complete_manifest(root, check_loads(root))
    card = model_card(root, repo_id, manifest, source_license(base_model(manifest), fetch_card),
                      peak_memory(root, manifest))
    _write_atomic(root / "README.md", card)
    return root / "README.md"


# --------------------------------------------------------------------------- upload
def upload(root: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           dry_run: bool = False, overwrite: bool = False,
           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[str]:
    """Publish `root` to `repo_id`; returns the uploaded (or, with dry_run, the to-be-uploaded) file names.

    dry_run writes the card and lists the files, contacting nobody. A repository that already holds another model
    (no zimage_mlx manifest, or one of another source or quantization) is refused without `overwrite`; with it, its
    files not in `root` are deleted in the same commit.
    """
    import huggingface_hub

    root = Path(root).expanduser()
    if not looks_like_repo_id(repo_id) or Path(repo_id).exists():
        raise PublishError(f"{repo_id}: not a hub repository id like owner/name")
    token = None
    if not dry_run:
        token = huggingface_hub.get_token()
        if not token:
            raise PublishError("no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) to upload")
    api = huggingface_hub.HfApi(token=token) if not dry_run else None
    write_card(root, repo_id, fetch_card=None if dry_run else _fetch_card)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and not p.relative_to(root).as_posix().startswith("."))
    total = sum((root / n).stat().st_size for n in names)
    log(f"{'would upload' if dry_run else 'uploading'} {len(names)} files, {total / 1e9:.2f} GB, to {repo_id}"
        f"{f' @ {revision}' if revision else ''}{' (private)' if private else ''}:")
    for n in names:
        log(f"  {n}  {(root / n).stat().st_size / 1e9:.3f} GB")
    if dry_run:
        return names
    _check_destination(api, repo_id, read_manifest(root), overwrite)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(root), revision=revision, ignore_patterns=[".*"],
                      delete_patterns=["*"] if overwrite else None,
                      commit_message=f"zimage-mlx upload: {describe_bits(_bits(read_manifest(root)))}")
    log(f"published https://huggingface.co/{repo_id}")
    return names


def _check_destination(api, repo_id: str, manifest: dict, overwrite: bool) -> None:
    """Refuse (without `overwrite`) a destination that holds another model."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.model_info(repo_id, files_metadata=False)
    except RepositoryNotFoundError:
        return
    names = {s.rfilename for s in info.siblings or ()} - {".gitattributes", "README.md"}
    if not names or overwrite:
        return
    theirs = None
    if MANIFEST_NAME in names:
        import huggingface_hub

        theirs = json.loads(Path(huggingface_hub.hf_hub_download(repo_id, MANIFEST_NAME)).read_text())
    same = theirs is not None and (theirs.get("source") or {}).get("files") == (manifest.get("source") or {}).get(
        "files") and _bits(theirs) == _bits(manifest)
    if not same:
        what = "another zimage_mlx model" if theirs is not None else f"{len(names)} files of another model"
        raise PublishError(f"{repo_id} exists and holds {what}; pass --overwrite to replace it, or choose another "
                           "repository name")


def _bits_label(bits: int | None) -> str:
    return f"{bits}-bit" if bits else "float"


def _bits(manifest: dict) -> dict:
    return {n: manifest["components"][n].get("bits") for n in ("transformer", "text_encoder")}


def _fetch_card(repo: str) -> str | None:
    """The base model's README.md from the hub (None when it cannot be had)."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(repo, "README.md")).read_text()
    except Exception:  # noqa: BLE001 - the card then states the known licence
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
