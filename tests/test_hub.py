"""Loading from the Hugging Face hub, offline: MLX-layout repos (exactly the files the manifest lists, checked,
loaded as saved), diffusers trees, hub single files, the download plan, and publishing.

No network: a Hugging Face cache in a temporary HF_HOME (models--ORG--NAME/{refs,snapshots}) and a stand-in hub
(`FakeHub`) whose `snapshot_download` / `hf_hub_download` copy from a local "remote" folder only what was asked
for, so the files requested are what is tested; its `HfApi` answers `model_info` from that folder and records
`create_repo` / `upload_folder`.
"""

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import constants, errors
from safetensors.torch import save_file

from make_pipeline import save_tiny_pipeline
from make_vae import save_tiny_vae_ldm
from test_convert import comfy_transformer_state

from zimage_mlx import ZImagePipeline
from zimage_mlx.apps.cli import cli
from zimage_mlx.loading import download, hub
from zimage_mlx.loading.convert import convert
from zimage_mlx.loading.publish import PublishError, upload, write_card
from zimage_mlx.loading.weights import WeightError

H, W = 32, 32
PROMPT = "a lighthouse at dusk"


def _error(name):
    cls = getattr(errors, name)
    return cls.__new__(cls)          # (their constructors want an HTTP response; the code looks at the class only)


class FakeHub:
    """Stand-ins for huggingface_hub's download functions and HfApi, over local "remote" folders."""

    def __init__(self, cache: Path):
        self.cache, self.repos, self.fetched, self.calls = cache, {}, [], []

    def add(self, repo: str, folder: Path, sha: str = "c" * 40):
        self.repos[repo] = (Path(folder), sha)

    def _remote(self, repo):
        if repo not in self.repos:
            raise _error("RepositoryNotFoundError")
        return self.repos[repo]

    def _snapshot(self, repo, sha):
        return self.cache / f"models--{repo.replace('/', '--')}" / "snapshots" / sha

    def _place(self, repo, name, revision):
        folder, sha = self._remote(repo)
        if revision not in (None, "main", sha):
            raise _error("RevisionNotFoundError")
        if not (folder / name).is_file():
            raise _error("RemoteEntryNotFoundError")
        dst = self._snapshot(repo, sha) / name
        if not dst.is_file():         # (huggingface_hub fetches a file of a commit once)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, dst)
            self.fetched.append((repo, name))
        if revision != sha:           # a branch download remembers the branch's commit, as huggingface_hub does
            refs = self._snapshot(repo, sha).parent.parent / "refs"
            refs.mkdir(exist_ok=True)
            (refs / (revision or "main")).write_text(sha)
        return str(dst)

    def _cached(self, repo, revision):
        ref = self.cache / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
        snap = self._snapshot(repo, ref.read_text()) if ref.is_file() else None
        if snap is None or not snap.is_dir():
            raise _error("LocalEntryNotFoundError")
        return snap

    def hf_hub_download(self, repo_id, filename, revision=None, local_files_only=False, **kw):
        if local_files_only:
            path = self._cached(repo_id, revision) / filename
            if not path.is_file():
                raise _error("LocalEntryNotFoundError")
            return str(path)
        return self._place(repo_id, filename, revision)

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            return str(self._cached(repo_id, revision))
        folder, sha = self._remote(repo_id)
        self.calls.append(("snapshot_download", repo_id, revision, list(allow_patterns or [])))
        for f in sorted(folder.rglob("*")):
            name = f.relative_to(folder).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns or ["*"]):
                self._place(repo_id, name, revision)
        return str(self._snapshot(repo_id, sha))

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        folder, sha = self._remote(repo_id)
        if revision not in (None, "main", sha):
            raise _error("RevisionNotFoundError")
        siblings = []
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            lfs = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size} \
                if f.suffix == ".safetensors" else None
            siblings.append(SimpleNamespace(rfilename=f.relative_to(folder).as_posix(), size=f.stat().st_size,
                                            lfs=lfs))
        return SimpleNamespace(sha=sha, siblings=siblings)

    def api(self):
        fake = self

        class Api:
            def __init__(self, token=None):
                fake.calls.append(("HfApi", token))

            def model_info(self, repo_id, **kw):
                return fake.model_info(repo_id, **kw)

            def create_repo(self, repo_id, **kw):
                fake.calls.append(("create_repo", repo_id, kw))

            def create_branch(self, repo_id, **kw):
                fake.calls.append(("create_branch", repo_id, kw))

            def upload_folder(self, **kw):
                fake.calls.append(("upload_folder", kw))

        return Api


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("ZIMAGE_MLX_CACHE", str(tmp_path / "zcache"))
    fake = FakeHub(cache)
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api())
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    return fake


@pytest.fixture(scope="module")
def trees(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny diffusers tree and its MLX conversion with a model card (sha256 inventory), as the remotes."""
    base = tmp_path_factory.mktemp("hub")
    root, models = save_tiny_pipeline(base / "Z-Image-Turbo", qwen_tokenizer_dir)
    mlx_dir = convert(base / "z-mlx", root, dtype="float32", log=lambda m: None)
    write_card(mlx_dir, "me/z-mlx")
    return root, mlx_dir, models


def _remote_copy(src: Path, dst: Path, extra: bool = True) -> Path:
    shutil.copytree(src, dst)
    if extra:      # a file that is in the repository but not in the manifest: never fetched
        (dst / "samples").mkdir()
        (dst / "samples" / "fox.png").write_bytes(b"\x89PNG" + b"0" * 1000)
    return dst


def _latents(pipe):
    noise = np.random.default_rng(0).standard_normal((1, 16, H // 8, W // 8)).astype(np.float32)
    return np.array(pipe(prompt=PROMPT, height=H, width=W, latents=noise, num_inference_steps=2,
                         output_type="latent").images)


def test_mlx_repo_fetches_exactly_the_manifest_and_loads_as_saved(fake_hub, trees, tmp_path, capsys):
    _, mlx_dir, _ = trees
    fake_hub.add("me/z-mlx", _remote_copy(mlx_dir, tmp_path / "remote"))
    pipe = ZImagePipeline.from_pretrained("me/z-mlx")
    manifest = json.loads((mlx_dir / "zimage_mlx.json").read_text())
    fetched = sorted(name for repo, name in fake_hub.fetched)
    assert fetched == sorted({"zimage_mlx.json", *manifest["files"]}), fetched    # no README, no samples/
    call = [c for c in fake_hub.calls if c[0] == "snapshot_download"]
    assert len(call) == 1 and call[0][2] == "c" * 40               # pinned to the commit the manifest came from
    assert "download plan for me/z-mlx @ cccccccccccc" in capsys.readouterr().err
    assert not (tmp_path / "zcache").exists()                        # loaded as saved: nothing converted
    assert pipe.dtype == mx.float32
    np.testing.assert_array_equal(_latents(pipe), _latents(ZImagePipeline.from_pretrained(mlx_dir)))
    # offline later: the cached snapshot serves (found through refs/main)
    hub_offline = hub.resolve_source("me/z-mlx", offline=True)
    assert hub_offline.name == "c" * 40 and (hub_offline / "zimage_mlx.json").is_file()


def test_incomplete_or_corrupt_snapshot_names_the_file(fake_hub, trees, tmp_path):
    _, mlx_dir, _ = trees
    fake_hub.add("me/z-mlx", _remote_copy(mlx_dir, tmp_path / "remote", extra=False))
    snap = hub.resolve_source("me/z-mlx")
    shard = snap / "vae" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))                                   # same size, other bytes
    with pytest.raises(WeightError, match=r"me/z-mlx: vae/model.safetensors has a sha256 that differs"):
        hub.resolve_source("me/z-mlx", offline=True)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(WeightError, match=r"vae/model.safetensors has \d+ bytes, the manifest says \d+"):
        hub.resolve_source("me/z-mlx", offline=True)
    shard.unlink()
    with pytest.raises(WeightError, match=r"vae/model.safetensors is missing from the snapshot"):
        hub.resolve_source("me/z-mlx", offline=True)


def test_remote_file_that_differs_from_the_manifest(fake_hub, trees, tmp_path):
    _, mlx_dir, _ = trees
    remote = _remote_copy(mlx_dir, tmp_path / "remote", extra=False)
    shard = remote / "text_encoder" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    fake_hub.add("me/z-mlx", remote)
    with pytest.raises(WeightError, match="text_encoder/model.safetensors has a sha256 that differs from the manif"):
        ZImagePipeline.from_pretrained("me/z-mlx")


def test_manifest_of_a_newer_format_is_refused_before_weights(fake_hub, trees, tmp_path):
    _, mlx_dir, _ = trees
    remote = _remote_copy(mlx_dir, tmp_path / "remote", extra=False)
    manifest = json.loads((remote / "zimage_mlx.json").read_text())
    (remote / "zimage_mlx.json").write_text(json.dumps({**manifest, "format_version": 2,
                                                        "zimage_mlx_version": "9.1.0"}))
    fake_hub.add("me/z-mlx", remote)
    with pytest.raises(WeightError, match=r"format version 2 \(written by zimage_mlx 9.1.0\) needs a newer "
                                          r"zimage_mlx; this one reads up to format version 1"):
        hub.resolve_source("me/z-mlx")
    assert [n for _, n in fake_hub.fetched] == ["zimage_mlx.json"]


def test_manifest_listing_a_file_the_repo_lacks(fake_hub, trees, tmp_path):
    _, mlx_dir, _ = trees
    remote = _remote_copy(mlx_dir, tmp_path / "remote", extra=False)
    (remote / "transformer" / "model.safetensors").unlink()
    fake_hub.add("me/z-mlx", remote)
    with pytest.raises(WeightError, match="the manifest lists transformer/model.safetensors, which the repository"):
        hub.resolve_source("me/z-mlx")


def test_diffusers_repo_fetches_the_pipeline_files_and_plans_the_conversion(fake_hub, trees, tmp_path, capsys):
    root, _, _ = trees
    remote = _remote_copy(root, tmp_path / "remote")
    (remote / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"0" * 100)   # a duplicate never fetched
    fake_hub.add("Tongyi-MAI/Z-Image-Turbo", remote)
    snap = hub.resolve_source("Tongyi-MAI/Z-Image-Turbo", convert_into=tmp_path / "zcache", dtype=mx.float32)
    fetched = {name for _, name in fake_hub.fetched}
    assert not any(n.endswith(".bin") or n.startswith("samples/") for n in fetched)
    weights = {p.relative_to(remote).as_posix() for p in remote.rglob("*.safetensors")}
    assert weights <= fetched and (snap / "model_index.json").is_file()
    err = capsys.readouterr().err
    assert "download plan for Tongyi-MAI/Z-Image-Turbo" in err and "then a converted MLX copy of" in err


def test_neither_layout_names_what_is_missing(fake_hub, tmp_path):
    remote = tmp_path / "remote"
    (remote / "transformer").mkdir(parents=True)
    (remote / "transformer" / "model.safetensors").write_bytes(b"x")
    fake_hub.add("someone/thing", remote)
    with pytest.raises(WeightError, match=r"someone/thing: neither a zimage_mlx repository \(no zimage_mlx.json\) "
                                          r"nor a diffusers Z-Image tree \(no text_encoder/ weights, vae/ weights, "
                                          r"tokenizer/\)"):
        hub.resolve_source("someone/thing")


def test_a_full_disk_is_refused_before_any_weight_byte(fake_hub, trees, tmp_path, monkeypatch):
    _, mlx_dir, _ = trees
    fake_hub.add("me/z-mlx", _remote_copy(mlx_dir, tmp_path / "remote"))
    monkeypatch.setattr(download, "free_bytes", lambda path: 1000)
    with pytest.raises(WeightError, match=r"me/z-mlx: not enough disk space: the download plan needs \d+\.\d\d GB .* "
                                          r"which has 0\.00 GB free"):
        ZImagePipeline.from_pretrained("me/z-mlx")
    assert [n for _, n in fake_hub.fetched] == ["zimage_mlx.json"]     # the manifest only
    assert not [c for c in fake_hub.calls if c[0] == "snapshot_download"]


@pytest.mark.parametrize("error, says", [("GatedRepoError", "gated repository"),
                                         ("RepositoryNotFoundError", "no such repository on the hub")])
def test_gated_or_missing_repo(fake_hub, monkeypatch, error, says):
    def fail(self, *a, **k):
        raise _error(error)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fail)
    for call in (lambda: hub.resolve_source("someone/model"), lambda: hub.resolve_file("someone/model/a.safetensors")):
        with pytest.raises(WeightError, match=says):
            call()


def test_convert_from_hub_single_files(fake_hub, trees, tmp_path, qwen_tokenizer_dir, capsys):
    root, _, models = trees
    remote = tmp_path / "comfy"
    (remote / "split_files" / "diffusion_models").mkdir(parents=True)
    (remote / "split_files" / "text_encoders").mkdir()
    (remote / "split_files" / "vae").mkdir()
    save_file(comfy_transformer_state(models["transformer"]),
              str(remote / "split_files" / "diffusion_models" / "z_image_turbo_bf16.safetensors"))
    te = {"model." + k: v.detach().clone().contiguous() for k, v in models["text_encoder"].state_dict().items()}
    save_file(te, str(remote / "split_files" / "text_encoders" / "qwen_3_4b.safetensors"))
    save_tiny_vae_ldm(remote / "split_files" / "vae" / "ae.safetensors", models["vae"])
    (remote / "unrelated.safetensors").write_bytes(b"0" * 100)
    fake_hub.add("Comfy-Org/z_image_turbo", remote)
    base = "Comfy-Org/z_image_turbo/split_files"
    configs = dict(transformer_config=root / "transformer" / "config.json", vae_config=root / "vae" / "config.json")
    out = convert(tmp_path / "out", transformer=f"{base}/diffusion_models/z_image_turbo_bf16.safetensors",
                  text_encoder=f"{base}/text_encoders/qwen_3_4b.safetensors", vae=f"{base}/vae/ae.safetensors",
                  tokenizer=qwen_tokenizer_dir, dtype="float32", log=lambda m: None, **configs)
    assert sorted(n for _, n in fake_hub.fetched) == sorted(
        ["split_files/diffusion_models/z_image_turbo_bf16.safetensors",
         "split_files/text_encoders/qwen_3_4b.safetensors", "split_files/vae/ae.safetensors"])
    assert capsys.readouterr().err.count("download plan for Comfy-Org/z_image_turbo") == 3
    ref = convert(tmp_path / "ref", transformer=remote / "split_files/diffusion_models/z_image_turbo_bf16.safetensors",
                  text_encoder=remote / "split_files/text_encoders/qwen_3_4b.safetensors",
                  vae=remote / "split_files/vae/ae.safetensors", tokenizer=qwen_tokenizer_dir, dtype="float32",
                  log=lambda m: None, **configs)
    np.testing.assert_array_equal(_latents(ZImagePipeline.from_pretrained(out)),
                                  _latents(ZImagePipeline.from_pretrained(ref)))
    # a second use is served from the cache: no plan, no download
    fake_hub.fetched.clear()
    assert hub.resolve_file(f"{base}/vae/ae.safetensors").is_file() and fake_hub.fetched == []
    with pytest.raises(WeightError, match="the hub repository has no file split_files/vae/missing.safetensors"):
        hub.resolve_file(f"{base}/vae/missing.safetensors")


def test_hub_single_file_repo_from_the_cache_offline(fake_hub, monkeypatch):
    """A single-file repo laid out in the HF_HOME cache (refs + snapshots) serves offline: the TAEF1 decoder."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snap = Path(constants.HF_HUB_CACHE) / "models--madebyollin--taef1" / "snapshots" / ("d" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("d" * 40)
    import torch
    from diffusers import AutoencoderTiny

    from zimage_mlx.pipeline.preview import load_tiny_decoder

    torch.manual_seed(0)
    AutoencoderTiny(latent_channels=16).save_pretrained(snap, safe_serialization=True)
    decoder = load_tiny_decoder("madebyollin/taef1/diffusion_pytorch_model.safetensors")
    assert decoder(mx.zeros((1, 16, 2, 2))).shape == (1, 16, 16, 3)


def test_upload_dry_run_writes_the_card_and_sends_nothing(fake_hub, trees, tmp_path):
    _, mlx_dir, _ = trees
    d = tmp_path / "pub"
    shutil.copytree(mlx_dir, d)
    (d / "README.md").unlink()
    result = CliRunner().invoke(cli, ["upload", str(d), "me/z-mlx", "--dry-run"])
    assert result.exit_code == 0, result.output
    card = (d / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("base_model: Tongyi-MAI/Z-Image-Turbo", "license: apache-2.0", "library_name: zimage-mlx",
                 "- mlx", "- z-image", "- text-to-image"):
        assert line in front.splitlines(), front
    assert "| transformer | float32 | float |" in card and 'from_pretrained("me/z-mlx")' in card
    assert "| 1024x1024 |" in card and "sha256:" in card
    assert "would upload" in result.output and "transformer/model.safetensors" in result.output
    assert not [c for c in fake_hub.calls if c[0] in ("HfApi", "upload_folder")]
    manifest = json.loads((d / "zimage_mlx.json").read_text())
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())


def test_upload_sends_the_folder(fake_hub, trees, tmp_path):
    _, mlx_dir, _ = trees
    d = shutil.copytree(mlx_dir, tmp_path / "pub")
    names = upload(d, "me/new-repo", private=True, revision="v1", log=lambda m: None)
    assert "README.md" in names and "zimage_mlx.json" in names
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["HfApi", "create_repo", "create_branch", "upload_folder"], kinds
    assert fake_hub.calls[0][1] == "hf_test_token" and fake_hub.calls[1][2]["private"] is True
    sent = fake_hub.calls[-1][1]
    assert sent["repo_id"] == "me/new-repo" and sent["folder_path"] == str(d) and sent["revision"] == "v1"
    assert sent["delete_patterns"] is None
    # the same model again is an update; another model is refused without --overwrite
    fake_hub.add("me/new-repo", d)
    upload(d, "me/new-repo", log=lambda m: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"0")
    fake_hub.add("me/other", other)
    with pytest.raises(PublishError, match="me/other exists and holds 1 files of another model; pass --overwrite"):
        upload(d, "me/other", log=lambda m: None)
    upload(d, "me/other", overwrite=True, log=lambda m: None)
    assert fake_hub.calls[-1][1]["delete_patterns"] == ["*"]


def test_upload_without_a_token_or_of_a_non_model(fake_hub, trees, tmp_path, monkeypatch):
    _, mlx_dir, _ = trees
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    result = CliRunner().invoke(cli, ["upload", str(mlx_dir), "me/z-mlx"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: no Hugging Face token: log in with `hf auth login`"), last
    with pytest.raises(PublishError, match="not a zimage_mlx directory"):
        upload(tmp_path, "me/z-mlx", dry_run=True)


def test_make_variants_uploads_each(fake_hub, trees, tmp_path):
    import importlib.util

    root, _, _ = trees
    script = Path(__file__).resolve().parents[1] / "convert" / "make_variants.py"
    spec = importlib.util.spec_from_file_location("make_variants", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(root), "--out", str(tmp_path), "--variants", "bf16", "--upload", "me"])
    sent = [c[1]["repo_id"] for c in fake_hub.calls if c[0] == "upload_folder"]
    assert sent == ["me/Z-Image-Turbo-mlx-bf16"]
    assert (tmp_path / "Z-Image-Turbo-mlx-bf16" / "README.md").is_file()


def test_no_network_falls_back_to_the_cached_snapshot(fake_hub, trees, tmp_path, monkeypatch):
    _, mlx_dir, _ = trees
    fake_hub.add("me/z-mlx", _remote_copy(mlx_dir, tmp_path / "remote", extra=False))
    snap = hub.resolve_source("me/z-mlx")

    def unreachable(self, *a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    assert hub.resolve_source("me/z-mlx") == snap                 # no HF_HUB_OFFLINE needed
    with pytest.raises(WeightError, match="someone/else: not a local path, and not in the local Hugging Face cache"):
        hub.resolve_source("someone/else")
