"""Several processes (several Macs) as one Z-Image: data-, CFG- and tensor-parallel generation on `mx.distributed`.

Processes are started by `mlx.launch` (ring over TCP/Thunderbolt, JACCL over Thunderbolt-5 RDMA, or MPI); outside a
launch `mx.distributed.init(strict=False)` gives a group of one and every helper here is a no-op.

- data: image k of a batch runs on rank k mod N (with its own seed); the images are gathered at the end.
- cfg: the positive and the negative branch of classifier-free guidance run on two ranks; the two velocities are
  exchanged once per step.
- tensor: the attention heads and the feed-forward width of the DiT and the text encoder are split across the ranks
  (Megatron-style, as mlx-lm's `models/qwen3.py` `Model.shard` does): q/k/v and w1/w3 are sharded by output
  ("all-to-sharded"), to_out and w2 by input ("sharded-to-all": one all_sum each); the text encoder's token table is
  split by vocabulary rows. Each rank reads only its part of every split tensor from disk (`weights.TensorSlice`).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import (AllToShardedLinear, QuantizedAllToShardedLinear, QuantizedShardedToAllLinear,
                                       ShardedToAllLinear, shard_linear)

from .models.transformer import feed_forward_width
from .loading.weights import WeightError, safetensors_layout, tensor_slice

PARALLEL_MODES = ("data", "cfg", "tensor")
ALL_TO_SHARDED, SHARDED_TO_ALL = "all-to-sharded", "sharded-to-all"

# Which Linear layers tensor parallelism splits, by the end of their module path, and how.
SPLITS = {
    "transformer": {
        "attention.to_q": ALL_TO_SHARDED, "attention.to_k": ALL_TO_SHARDED, "attention.to_v": ALL_TO_SHARDED,
        "attention.to_out.0": SHARDED_TO_ALL,
        "feed_forward.w1": ALL_TO_SHARDED, "feed_forward.w3": ALL_TO_SHARDED, "feed_forward.w2": SHARDED_TO_ALL,
    },
    "text_encoder": {
        "self_attn.q_proj": ALL_TO_SHARDED, "self_attn.k_proj": ALL_TO_SHARDED, "self_attn.v_proj": ALL_TO_SHARDED,
        "self_attn.o_proj": SHARDED_TO_ALL,
        "mlp.gate_proj": ALL_TO_SHARDED, "mlp.up_proj": ALL_TO_SHARDED, "mlp.down_proj": SHARDED_TO_ALL,
    },
}
SPLIT_EMBEDDINGS = {"text_encoder": ("embed_tokens",)}
HEAD_COUNTS = ("n_heads", "n_kv_heads")     # attributes of the attention modules that count heads per rank
QUERY_LAYERS = ("to_q", "q_proj")


# --------------------------------------------------------------------------- the group
def init_group() -> mx.distributed.Group:
    """The process group of this launch (a group of one outside `mlx.launch`)."""
    return mx.distributed.init(strict=False)


def check_mode(parallel: str | None) -> str | None:
    if parallel is None or parallel in PARALLEL_MODES:
        return parallel
    raise ValueError(f"parallel must be one of {', '.join(map(repr, PARALLEL_MODES))} or None, got {parallel!r}")


def barrier(group: mx.distributed.Group) -> None:
    """Wait until every rank gets here."""
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))


def shared_random_seed(group: mx.distributed.Group) -> int:
    """A random seed drawn by rank 0 and known to every rank (all must draw the same noise)."""
    seed = int(np.random.default_rng().integers(0, 2**31)) if group.rank() == 0 else 0
    if group.size() == 1:
        return seed
    return int(mx.distributed.all_sum(mx.array([seed], dtype=mx.int32), group=group).item())


def failed_ranks(failed: bool, group: mx.distributed.Group) -> list[int]:
    """Every rank says whether it failed; all learn which ranks did (a collective: each rank must call it)."""
    if group.size() == 1:
        return [0] if failed else []
    flags = mx.zeros((group.size(),)).at[group.rank()].add(1.0 if failed else 0.0)
    flags = mx.distributed.all_sum(flags, group=group)
    return [r for r, f in enumerate(flags.tolist()) if f > 0]


def gather_batches(local: mx.array, group: mx.distributed.Group) -> mx.array:
    """Data parallelism's gather: rank r holds images r, r+N, r+2N, … of a batch (rank 0 at least one; a later rank
    possibly none, as a (0, …) array of the right rank); every rank gets the whole batch back, in order."""
    n, rank = group.size(), group.rank()
    if n == 1:
        return local
    # one all_sum tells everyone each rank's count and rank 0's image shape
    meta = [0] * (n + local.ndim - 1)
    meta[rank] = local.shape[0]
    if rank == 0:
        meta[n:] = local.shape[1:]
    meta = mx.distributed.all_sum(mx.array(meta, dtype=mx.int32), group=group).tolist()
    counts, item = meta[:n], tuple(meta[n:])
    m = max(counts)
    if local.shape[0] < m:
        local = mx.concatenate([local.reshape(-1, *item), mx.zeros((m - local.shape[0], *item), dtype=local.dtype)])
    everything = mx.distributed.all_gather(local, group=group)
    # rank r's j-th image is row r*m + j of `everything` and image j*N + r of the batch
    order = [r * m + j for j in range(m) for r in range(n) if j < counts[r]]
    batch = everything[mx.array(order)]
    # evaluated here: a lost peer then raises, whereas np.array of a lazy collective's result was seen to swallow
    # the error and hand back whatever the buffer held (MLX 0.32.4)
    mx.eval(batch)
    return batch


# --------------------------------------------------------------------------- a lost peer
# MLX's ring backend gives up on a connection after ten failed transfers: it prints this line, fails the transfers
# then queued and stops that connection's worker thread (mlx/distributed/ring/ring.cpp, `SocketThread::worker`). A
# transfer queued on that connection afterwards is never served, so a collective can wait forever instead of raising
# "connection to a peer was lost" -- a race seen when a peer is killed mid-step.
RING_GAVE_UP = b"[ring] Too many send/recv errors"


def watch_for_lost_peers(on_lost: Callable[[], None], grace_s: float = 5.0) -> None:
    """Call on_lost (from another thread) grace_s seconds after MLX's ring backend gives up on a peer, unless the
    process has ended by then: the normal path is the collective raising, which the entry point turns into its error
    line; this catches the collective that waits forever instead.

    For a process's entry point only: MLX reports on the C++ standard error, so file descriptor 2 becomes a pipe that
    a daemon thread copies to the real standard error while it looks for RING_GAVE_UP. Python's sys.stderr writes to
    the real one directly (a terminal stays a terminal for the progress line)."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
    threading.Thread(target=_copy_and_watch, args=(read_end, real, on_lost, grace_s), daemon=True,
                     name="zimage-mlx-peer-watch").start()


def _copy_and_watch(read_end: int, real: int, on_lost: Callable[[], None], grace_s: float) -> None:
    seen = b""
    armed = False
    while chunk := os.read(read_end, 65536):
        view = memoryview(chunk)
        while view:
            view = view[os.write(real, view):]
        seen = seen[-len(RING_GAVE_UP):] + chunk
        if not armed and RING_GAVE_UP in seen:
            armed = True
            timer = threading.Timer(grace_s, on_lost)
            timer.daemon = True
            timer.start()


# --------------------------------------------------------------------------- which sizes work
def split_dims(name: str, config: dict) -> dict[str, tuple[int, int | None]]:
    """What must divide by the number of ranks: {what: (size, input width of the layer split by input)}."""
    if name == "transformer":
        dim, heads = config.get("dim", 3840), config.get("n_heads", 30)
        ffn = feed_forward_width(dim)
        return {"attention heads": (heads, dim), "feed-forward width": (ffn, ffn)}
    heads = config.get("num_attention_heads", 32)
    head_dim = config.get("head_dim") or config.get("hidden_size", 2560) // heads
    inter = config.get("intermediate_size", 9728)
    return {"attention heads": (heads, heads * head_dim),
            "key/value heads": (config.get("num_key_value_heads", 8), None),
            "feed-forward width": (inter, inter), "vocabulary": (config.get("vocab_size", 151936), None)}


def tensor_parallel_sizes(name: str, config: dict, bits: int | None = None, group_size: int = 64,
                          up_to: int = 64) -> list[int]:
    """The process counts (2 … up_to) that split `name` evenly: every count in `split_dims` divides, and with
    quantization each layer split by its input keeps whole quantization groups (when the policy quantizes it)."""
    out = []
    for n in range(2, up_to + 1):
        ok = True
        for size, width in split_dims(name, config).values():
            ok &= size % n == 0
            if bits and width is not None and width % group_size == 0:
                ok &= (width // n) % group_size == 0
        if ok:
            out.append(n)
    return out


def check_tensor_parallel(config: dict, size: int, bits: int | None = None, group_size: int = 64) -> None:
    """Refuse a process count that does not split the transformer evenly, saying which counts do."""
    if size in tensor_parallel_sizes("transformer", config, bits, group_size, up_to=max(size, 2)):
        return
    dims = ", ".join(f"{v[0]} {k}" for k, v in split_dims("transformer", config).items())
    works = tensor_parallel_sizes("transformer", config, bits, group_size)
    quant = f" and {bits}-bit groups of {group_size}" if bits else ""
    if works:
        counts = " or ".join([", ".join(map(str, works[:-1])), str(works[-1])] if len(works) > 1 else [str(works[0])])
        fix = f"use {counts} processes"
    else:
        fix = "no process count splits it evenly (use parallel='data' or 'cfg')"
    raise ValueError(f"parallel='tensor' cannot split the transformer ({dims}{quant}) across {size} processes; {fix}")


def is_split(name: str, key: str) -> bool:
    """Whether tensor parallelism splits parameter `key` (a module path + ".weight" etc.) of component `name`."""
    module = key.rsplit(".", 1)[0]
    return any(module.endswith(s) for s in SPLITS.get(name, {})) or module in SPLIT_EMBEDDINGS.get(name, ())


# --------------------------------------------------------------------------- sharded modules
def _vocab_split_lookup(embedding: nn.Module, lookup, ids: mx.array) -> mx.array:
    local = ids - embedding.start
    mine = (local >= 0) & (local < embedding.rows)
    h = lookup(mx.where(mine, local, 0))
    return mx.distributed.all_sum(h * mine[..., None].astype(h.dtype), group=embedding.group)


class ShardedEmbedding(nn.Embedding):
    """A token table split by vocabulary rows: each rank looks up the ids in its rows (zeros elsewhere) and an
    all_sum assembles the embeddings; exact, since the other ranks add zeros."""

    def __init__(self, num_embeddings: int, dims: int, group: mx.distributed.Group):
        rows, start = _rows(num_embeddings, group)
        super().__init__(rows, dims)
        self.group, self.rows, self.start = group, rows, start

    def __call__(self, ids: mx.array) -> mx.array:
        return _vocab_split_lookup(self, super().__call__, ids)


class QuantizedShardedEmbedding(nn.QuantizedEmbedding):
    """`ShardedEmbedding` for a quantized token table (rows of packed weights, scales and biases)."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int, bits: int, mode: str,
                 group: mx.distributed.Group):
        rows, start = _rows(num_embeddings, group)
        super().__init__(rows, dims, group_size, bits, mode=mode)
        self.group, self.rows, self.start = group, rows, start

    def __call__(self, ids: mx.array) -> mx.array:
        return _vocab_split_lookup(self, super().__call__, ids)


def _rows(num_embeddings: int, group: mx.distributed.Group) -> tuple[int, int]:
    n = group.size()
    if num_embeddings % n:
        raise ValueError(f"cannot split a vocabulary of {num_embeddings} across {n} processes")
    return num_embeddings // n, group.rank() * (num_embeddings // n)


def _shard_embedding(module: nn.Module, group: mx.distributed.Group) -> nn.Module:
    if isinstance(module, nn.QuantizedEmbedding):
        return QuantizedShardedEmbedding(module.num_embeddings, module.dims, module.group_size, module.bits,
                                         getattr(module, "mode", "affine"), group)
    return ShardedEmbedding(*module.weight.shape, group)


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    parent = model
    for p in parents:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def shard_model(name: str, model: nn.Module, group: mx.distributed.Group) -> nn.Module:
    """Replace the layers `SPLITS` names with their tensor-parallel forms (`shard_linear`, Linear or
    QuantizedLinear alike) and divide the attention modules' head counts. Parameters stay lazy (unevaluated)."""
    n = group.size()
    rules = SPLITS[name]
    for path, module in list(model.named_modules()):
        rule = next((kind for end, kind in rules.items() if path.endswith("." + end) or path == end), None)
        if rule is not None:
            _set_child(model, path, shard_linear(module, rule, group=group))
            parent_path, _, leaf = path.rpartition(".")
            if leaf in QUERY_LAYERS:
                attention = dict(model.named_modules())[parent_path]
                for attr in HEAD_COUNTS:
                    if hasattr(attention, attr):
                        setattr(attention, attr, getattr(attention, attr) // n)
        elif path in SPLIT_EMBEDDINGS.get(name, ()):
            _set_child(model, path, _shard_embedding(module, group))
    return model


def _split_axis(module: nn.Module, param: str) -> int | None:
    if isinstance(module, (AllToShardedLinear, QuantizedAllToShardedLinear, ShardedEmbedding,
                           QuantizedShardedEmbedding)):
        return 0
    if isinstance(module, (ShardedToAllLinear, QuantizedShardedToAllLinear)):
        return None if param == "bias" else -1
    return None


def shard_weights(model: nn.Module, weights: dict, group: mx.distributed.Group,
                  sources: dict[str, tuple[Path, str]]) -> dict:
    """This rank's part of every tensor a sharded `model` splits, the rest unchanged (`weights` is consumed).

    sources: {module key: (file, key in the file)} for tensors read straight from a file: those become
    `TensorSlice`s (only this rank's bytes are read). A tensor computed from the file (e.g. a fused qkv split by
    `sanitize`) is sliced after it is evaluated, one tensor at a time.
    """
    n, r = group.size(), group.rank()
    layouts: dict[Path, tuple] = {}
    for path, module in model.named_modules():
        for param in module.parameters():
            axis = _split_axis(module, param)
            key = f"{path}.{param}"
            if axis is None or key not in weights:
                continue
            value = weights.pop(key)
            if key in sources:
                file, file_key = sources[key]
                if file not in layouts:
                    layouts[file] = safetensors_layout(file)
                weights[key] = tensor_slice(file, file_key, axis, r, n, layouts[file])
            else:
                if value.shape[axis] % n:
                    raise WeightError(f"tensor {key} has shape {tuple(value.shape)}; its axis {axis} does not split "
                                      f"into {n} equal parts")
                # mx.array copies the part, so the whole tensor is freed once the part is evaluated
                weights[key] = lambda v=value, a=axis: mx.array(mx.split(v, n, axis=a)[r])
    return weights
