"""The server's image history on disk (docs/server.md#history): each kept image is `ID.<ext>` (the very bytes its
client got) next to `ID.json` (its parameters), in one folder, bounded by a number of images and a number of bytes
(the oldest go first).

IDs are `<unix time in ns, 20 digits>-<8 random hex digits>`, so their text order is their time order; every lookup
checks an ID against that pattern before it becomes a path. Writes are atomic (a hidden temporary file, then
os.replace), the image first and its JSON last: the JSON is what makes an entry exist, so an image left without one
(a crash between the two writes) is never listed, and is removed when the folder is next opened. Only files named
like entries (and their temporary files) are ever removed; anything else in the folder is left alone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

EXTS = ("png", "jpeg", "webp")
ID_PATTERN = r"\d{20}-[0-9a-f]{8}"
_ID = re.compile(ID_PATTERN)
_FILE = re.compile(rf"({ID_PATTERN})\.(json|{'|'.join(EXTS)})")
_TEMP = re.compile(rf"\.({ID_PATTERN})\.(json|{'|'.join(EXTS)})\..*\.part")


class HistoryError(RuntimeError):
    """The history folder cannot be created or written."""


class History:
    """Kept images, newest last on disk and newest first in `list()`; safe to use from several threads."""

    def __init__(self, root: str | Path, max_items: int, max_bytes: int):
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"history bounds must be positive, got {max_items} items and {max_bytes} bytes")
        self.root, self.max_items, self.max_bytes = Path(root).expanduser(), max_items, max_bytes
        self.lock = threading.Lock()
        self._last_ns = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=".part", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise HistoryError(f"cannot write the history folder {self.root}: {e.strerror or e} (choose another "
                               "with --history-dir, or turn history off with --history 0)") from None
        self.entries: dict[str, dict] = self._scan()    # id -> {"id", "ext", "bytes", "params"}
        self._prune()

    # ------------------------------------------------------------------ reading
    def list(self, limit: int | None = None) -> list[dict]:
        """The entries, newest first: {"id", "created", "file", "params"}."""
        with self.lock:
            ids = sorted(self.entries, reverse=True)[:limit]
            return [self._public(self.entries[i]) for i in ids]

    def get(self, id: str) -> dict | None:
        with self.lock:
            e = self.entries.get(id) if isinstance(id, str) and _ID.fullmatch(id) else None
            return self._public(e) if e else None

    def path(self, id: str) -> Path | None:
        """The image of entry `id`, or None (an unknown or malformed ID)."""
        e = self.get(id)
        return self.root / e["file"] if e else None

    def file(self, name: str) -> Path | None:
        """The image named `ID.<ext>` (its real extension), or None."""
        m = _FILE.fullmatch(name) if isinstance(name, str) else None
        if m is None or m[2] == "json":
            return None
        p = self.path(m[1])
        return p if p is not None and p.name == name else None

    # ------------------------------------------------------------------ writing
    def add(self, blob: bytes, ext: str, params: dict) -> str | None:
        """Keep an image and its parameters (to which "id" and "created" are added); then drop the oldest until
        the bounds hold. Returns the new ID, or None (nothing written) when this one image is over the byte bound."""
        if ext not in EXTS:
            raise ValueError(f"history images are {', '.join(EXTS)}, got {ext!r}")
        with self.lock:
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            id = f"{self._last_ns:020d}-{secrets.token_hex(4)}"
            params = {"id": id, "created": self._last_ns // 10**9, **{k: v for k, v in params.items()
                                                                       if k not in ("id", "created")}}
            meta = json.dumps(params, ensure_ascii=False).encode("utf-8")
            if len(blob) + len(meta) > self.max_bytes:   # it could never be kept: the others stay
                return None
            self._write(f"{id}.{ext}", blob)
            self._write(f"{id}.json", meta)
            self.entries[id] = {"id": id, "ext": ext, "bytes": len(blob) + len(meta), "params": params}
            self._prune()
            return id

    def delete(self, id: str) -> bool:
        """Remove entry `id` (its JSON first, then its image); False when there is no such entry."""
        with self.lock:
            e = self.entries.pop(id, None) if isinstance(id, str) and _ID.fullmatch(id) else None
            if e is None:
                return False
            self._remove(e)
            return True

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _public(e: dict) -> dict:
        return {"id": e["id"], "created": e["params"].get("created"), "file": f"{e['id']}.{e['ext']}",
                "params": dict(e["params"])}

    def _write(self, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _remove(self, e: dict) -> None:
        (self.root / f"{e['id']}.json").unlink(missing_ok=True)
        (self.root / f"{e['id']}.{e['ext']}").unlink(missing_ok=True)

    def _prune(self) -> None:
        """Drop the oldest entries until there are at most max_items of them and max_bytes in all."""
        total = sum(e["bytes"] for e in self.entries.values())
        for id in sorted(self.entries):
            if len(self.entries) <= self.max_items and total <= self.max_bytes:
                break
            e = self.entries.pop(id)
            total -= e["bytes"]
            self._remove(e)

    def _scan(self) -> dict[str, dict]:
        """The entries on disk; leftover temporary files and images without a JSON are removed."""
        names = {p.name: p for p in self.root.iterdir()}
        entries, images = {}, {}
        for name, p in names.items():
            if _TEMP.fullmatch(name):
                p.unlink(missing_ok=True)
            elif (m := _FILE.fullmatch(name)) and m[2] != "json":
                images[m[1]] = m[2]
        for id, ext in images.items():
            meta = names.get(f"{id}.json")
            params = _read_params(meta) if meta is not None else None
            if params is None:
                (self.root / f"{id}.{ext}").unlink(missing_ok=True)
                continue
            size = (self.root / f"{id}.{ext}").stat().st_size + meta.stat().st_size
            entries[id] = {"id": id, "ext": ext, "bytes": size, "params": {**params, "id": id}}
        for name, p in names.items():   # a JSON whose image is gone describes nothing
            m = _FILE.fullmatch(name)
            if m and m[2] == "json" and m[1] not in entries:
                p.unlink(missing_ok=True)
        return entries


def _read_params(path: Path) -> dict | None:
    try:
        params = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) else None
