"""Data-, CFG- and tensor-parallel generation (zimage_mlx/distributed.py) with 2 local processes on the loopback
interface (`mlx.launch -n 2`, ring backend), against one process on the same tiny checkpoint.

The checkpoint's head counts and widths divide by 2 (and by 2 x 64-wide 4-bit groups); its transformer is wide
enough (dim 384) that the split layers dominate its weights, as in the real model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from make_pipeline import save_tiny_pipeline

from zimage_mlx import ZImagePipeline
from zimage_mlx.distributed import (check_tensor_parallel, gather_batches, init_group, tensor_parallel_sizes)
from zimage_mlx.models.transformer import ZImageTransformerConfig

from conftest import rel_err

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 150          # seconds for any launch (imports dominate on a busy 2-core machine)
WIDE = dict(dim=384, n_heads=2, n_kv_heads=2, axes_dims=[64, 64, 64])
TE = dict(head_dim=32, intermediate_size=128)     # o_proj and down_proj inputs 128: two 64-wide groups per rank
GEN = ["--steps", "2", "-W", "64", "-H", "64", "--dtype", "float32", "-q", "none"]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MLX_RANK", None)
    env.pop("MLX_HOSTFILE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str]) -> subprocess.Popen:
    """`mlx.launch -n 2` (ring backend, loopback; the console script's entry point, run with this Python) running
    `python ARGS` in its own process group."""
    cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", "2",
           "--backend", "ring", "--starting-port", str(_free_port()), "--", sys.executable, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qwen_tokenizer_dir):
    root, _ = save_tiny_pipeline(tmp_path_factory.mktemp("dist") / "tiny", qwen_tokenizer_dir,
                                 transformer_overrides=WIDE, text_encoder_overrides=TE)
    return root


# ----------------------------------------------------------------------------------------------- one process
def test_one_process_is_unchanged_by_parallel(tiny):
    """Outside a launch the group has one process and every mode generates exactly what no mode does."""
    assert init_group().size() == 1
    kw = dict(prompt="a red fox", height=64, width=64, num_inference_steps=2, guidance_scale=2.0, seed=1,
              num_images_per_prompt=2, output_type="latent")
    ref = np.array(ZImagePipeline.from_pretrained(tiny, dtype="float32")(**kw).images)
    for mode in ("data", "cfg", "tensor"):
        pipe = ZImagePipeline.from_pretrained(tiny, dtype="float32", parallel=mode)
        assert pipe.world_size == 1 and pipe.rank == 0
        np.testing.assert_array_equal(np.array(pipe(**kw).images), ref)


def test_tensor_parallel_sizes_of_the_real_model():
    real = vars(ZImageTransformerConfig())
    # 30 heads and a 10240-wide FFN: only counts dividing both
    assert tensor_parallel_sizes("transformer", real, up_to=30) == [2, 5, 10]
    # Qwen3-4B: 32 query / 8 key-value heads, FFN 9728, vocabulary 151936
    assert tensor_parallel_sizes("text_encoder", {}, bits=4, up_to=16) == [2, 4, 8]
    with pytest.raises(ValueError, match=r"30 attention heads, 10240 feed-forward width\) across 3 processes; "
                                         r"use 2, 5 or 10 processes"):
        check_tensor_parallel(real, 3)
    check_tensor_parallel(real, 2, bits=4)


def test_tensor_parallel_size_refused_for_the_tiny_model():
    with pytest.raises(ValueError, match="across 3 processes; use 2 processes"):
        check_tensor_parallel(WIDE, 3)
    # dim 192 halved leaves 96-wide to_out inputs: not whole 64-wide 4-bit groups (float splits fine)
    check_tensor_parallel({"dim": 192, "n_heads": 2}, 2)
    with pytest.raises(ValueError, match="4-bit groups of 64\\) across 2 processes; no process count splits it"):
        check_tensor_parallel({"dim": 192, "n_heads": 2}, 2, bits=4)


def test_gather_with_one_process_returns_its_batch():
    x = mx.arange(6).reshape(3, 2)
    assert gather_batches(x, init_group()) is x


# ----------------------------------------------------------------------------------------------- two processes
def test_cfg_and_tensor_parallel_match_one_process(tiny, tmp_path):
    """CFG- and tensor-parallel latents equal one process's to float32 round-off; a tensor-parallel process holds
    and peaks at well under one process's memory (4-bit included); CFG-parallel refuses a call without guidance."""
    cases = ["cfg", "tensor", "tensor-cfg-4bit", "cfg-cache", "tensor-cache"]
    args = [str(WORKER), str(tiny)]
    one = subprocess.Popen([sys.executable, *args, str(tmp_path / "one"), *cases], cwd=REPO, env=_env(),
                           stderr=subprocess.PIPE, text=True)
    two = _launch([*args, str(tmp_path / "two"), *cases, "cfg-without-guidance"])
    rc, _, err = _finish(two, TIMEOUT + 60)     # five cases, two of them 8 steps
    assert rc == 0, err[-3000:]
    rc, _, err = _finish(one)
    assert rc == 0, err[-3000:]
    ref = np.load(tmp_path / "one-0.npz")
    ranks = [np.load(tmp_path / f"two-{r}.npz") for r in (0, 1)]
    assert all(r["cfg-without-guidance"] for r in ranks)     # CFG-parallel refuses a call without guidance
    for case in cases:
        assert rel_err(ranks[0][case], ref[case]) <= 1e-4, case
        # tensor-parallel ranks fuse their shards of q/k/v (all-to-sharded layers) like one process does
        assert ref[f"{case}/fused"] and all(r[f"{case}/fused"] for r in ranks), case
        np.testing.assert_array_equal(ranks[1][case], ranks[0][case])
    for case in ("cfg-cache", "tensor-cache"):
        # a step cache decides once per step, the same on every process (rank 0's positive-branch signal), as
        # one process decides; and it skips some steps, not all
        computed = ref[f"{case}/computed"]
        assert 0 < (~computed).sum() < len(computed) - 1, (case, computed)
        for r in ranks:
            np.testing.assert_array_equal(r[f"{case}/computed"], computed)
            np.testing.assert_array_equal(r[f"{case}/signal"], ranks[0][f"{case}/signal"])
        np.testing.assert_allclose(ranks[0][f"{case}/signal"], ref[f"{case}/signal"], rtol=1e-4)
    for r in ranks:
        for case in ("tensor", "tensor-cfg-4bit"):
            assert r[f"{case}/peak"] < 0.75 * ref[f"{case}/peak"], (case, r[f"{case}/peak"], ref[f"{case}/peak"])
        # float weights: the split layers are ~80% of this transformer, so a rank holds ~60% (4-bit: the float
        # embedders weigh more, ~72%)
        assert r["tensor/transformer_bytes"] < 0.75 * ref["tensor/transformer_bytes"]


def test_data_parallel_cli_writes_the_same_files(tiny, tmp_path):
    """`mlx.launch -n 2 -- python -m zimage_mlx.generate --parallel data`: images 0 and 2 on rank 0, 1 on rank 1;
    rank 0 alone writes them (and prints their paths) and they are byte-identical to one process's."""
    from click.testing import CliRunner

    from zimage_mlx.apps.cli import generate

    args = ["a red fox", "-m", str(tiny), *GEN, "-n", "3", "--seed", "7"]
    two = _launch(["-m", "zimage_mlx.generate", *args, "-o", str(tmp_path / "two" / "fox-{seed}.png"),
                   "--parallel", "data"])
    result = CliRunner().invoke(generate, [*args, "-o", str(tmp_path / "one" / "fox-{seed}.png")])
    assert result.exit_code == 0, result.output
    rc, out, err = _finish(two)
    assert rc == 0, err[-3000:]
    assert out.split() == [str(tmp_path / "two" / f"fox-{s}.png") for s in (7, 8, 9)]
    assert err.count("done: 3 images") == 1
    for s in (7, 8, 9):
        assert (tmp_path / "two" / f"fox-{s}.png").read_bytes() == (tmp_path / "one" / f"fox-{s}.png").read_bytes()


def test_a_killed_process_stops_the_others(tiny, tmp_path):
    """Two ranks started by hand (no launcher to clean up): rank 1 is killed mid-run; rank 0 exits with one error line
    within the timeout instead of waiting for it forever."""
    port = _free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(f'[["127.0.0.1:{port}"], ["127.0.0.1:{port + 1}"]]')
    cmd = [sys.executable, "-m", "zimage_mlx.generate", "a red fox", "-m", str(tiny), "--steps", "1000", "-W", "64",
           "-H", "64", "--dtype", "float32", "-q", "none", "--seed", "1", "--parallel", "tensor",
           "-o", str(tmp_path / "fox.png"), "--preview", str(tmp_path / "step.png")]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env() | {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in (0, 1)]
    try:
        # rank 0 prints its plan before the models load; from then on both ranks exchange data every layer
        lines = []
        for line in procs[0].stderr:
            lines.append(line)
            if line.startswith("Z-Image"):
                break
        assert lines and lines[-1].startswith("Z-Image"), "".join(lines)
        # before MLX's silent wait for every process to connect, rank 0 says what it waits for
        assert lines[0] == f"connecting the processes of the launch ({hostfile}); this waits for all of them\n"
        # mid-run: rank 0 refreshes its step preview, so both ranks are in the denoising loop
        deadline = time.monotonic() + 60
        while not (tmp_path / "step.png").exists() and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "step.png").exists(), "rank 0 never reached the denoising loop"
        time.sleep(0.5)
        procs[1].kill()
        try:
            _, err = procs[0].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(procs[0].pid, signal.SIGKILL)
            _, err = procs[0].communicate()
            tail = "\n".join(line for line in err.splitlines() if not line.startswith("[ring]"))[-2000:]
            pytest.fail(f"rank 0 still runs 60 s after rank 1 was killed; its stderr (without [ring] lines):\n{tail}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert procs[0].returncode == 1
    # MLX's ring backend writes its own "[ring] ..." lines from another thread, so ours may follow an unfinished one
    errors = [line[line.index("error:"):] for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: process 0 of 2: "), err[-2000:]
    assert not (tmp_path / "fox.png").exists()


# A collective that waits forever: after MLX's ring gives up on a dead peer's connection (it fails the transfers then
# queued and stops that connection's worker), the next transfer on it is never served. Rank 1 leaves at once; rank 0's
# first all_sums raise, a later one waits forever -- without the watch this script hangs.
WAITS_FOREVER = """
import os, sys
import mlx.core as mx
from zimage_mlx.distributed import watch_for_lost_peers
group = mx.distributed.init(strict=True, backend="ring")
if group.rank() == 1:
    os._exit(0)
watch_for_lost_peers(lambda: (print("lost", flush=True), os._exit(3)), grace_s=1.0)
print("python's stderr still works", file=sys.stderr)
for i in range(8):
    try:
        mx.eval(mx.distributed.all_sum(mx.ones((4,)), group=group))
    except RuntimeError as e:
        print("raised:", e, flush=True)
print("never waited", flush=True)
"""


def test_a_collective_waiting_on_a_dead_peer_ends(tmp_path):
    """The case behind `test_a_killed_process_stops_the_others`' rare hang, made certain: the watch calls back shortly
    after MLX reports that it gave up on the peer, and everything written to the standard error still arrives."""
    script = tmp_path / "waits.py"
    script.write_text(WAITS_FOREVER)
    port = _free_port()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(f'[["127.0.0.1:{port}"], ["127.0.0.1:{port + 1}"]]')
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO,
                              env=_env() | {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in (1, 0)]
    rc, out, err = _finish(procs[1], timeout=60)
    procs[0].communicate()
    assert rc == 3, (out, err[-2000:])
    assert out.splitlines()[0] == "raised: [ring] connection to a peer was lost" and out.splitlines()[-1] == "lost"
    assert "python's stderr still works" in err
    assert "[ring] Too many send/recv errors" in err        # MLX's own lines are copied through


WATCH_ONLY = """
import os, sys, time
from zimage_mlx.distributed import watch_for_lost_peers
watch_for_lost_peers(lambda: (print("lost", flush=True), os._exit(3)), grace_s=0.3)
print("tty" if sys.stderr.isatty() else "not a tty", flush=True)
os.write(2, sys.argv[1].encode() + b"\\n")
time.sleep(1.5)
print("done", flush=True)
"""


@pytest.mark.parametrize("line, lost", [("[ring] Sending to socket 4 failed with errno 4", False),
                                        ("[ring] Too many send/recv errors. Failing pending tasks...", True)])
def test_the_watch_calls_back_only_when_mlx_gives_up(tmp_path, line, lost):
    """One failed transfer is retried by MLX (no call back); its giving up on the connection is. The standard error
    of a terminal stays a terminal for Python (the progress line), and MLX's lines reach it."""
    import pty

    script = tmp_path / "watch.py"
    script.write_text(WATCH_ONLY)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(script), line], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=follower, text=True)
    os.close(follower)
    out, _ = proc.communicate(timeout=60)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    os.close(leader)
    assert out.splitlines() == (["tty", "lost"] if lost else ["tty", "done"])
    assert proc.returncode == (3 if lost else 0)
    assert line.encode() in terminal


def test_memory_plan_counts_one_process_share():
    """A 1024² bf16 generation on 16 GB Macs (12.7 GB working set): one Mac must quantize, two tensor-parallel Macs
    run bf16, each holding about half the split weights."""
    from dataclasses import asdict

    from zimage_mlx.memory import plan_memory
    from zimage_mlx.models.vae import VAEConfig

    configs = {"transformer": {}, "text_encoder": {}, "vae": asdict(VAEConfig())}
    kw = dict(requested="auto", height=1024, width=1024, available=int(12.7e9), source="test", cpu=False)
    one = plan_memory(configs, mx.bfloat16, **kw)
    two = plan_memory(configs, mx.bfloat16, shards={"transformer": 2, "text_encoder": 2}, **kw)
    assert one.bits == {"transformer": 8, "text_encoder": 8}
    assert two.bits == {"transformer": None, "text_encoder": None}
    assert 6.0e9 < two.stages["weights_transformer"] < 6.5e9        # 12.31 GB bf16: split layers halved
    assert "transformer split over 2 processes" in two.summary() and "per process" in two.summary()
