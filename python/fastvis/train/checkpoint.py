"""Checkpoints that survive ``kill -9``.

Every file is written **atomically**: into a temporary file in the same directory, flushed
and ``fsync``-ed, renamed over the final name (``os.replace``, atomic on POSIX), and the
directory is ``fsync``-ed so the rename itself is durable. A run killed at any instant
therefore leaves each checkpoint either complete or absent (at worst a stray
``.*.tmp-<pid>`` file, removed at the next start); the last good checkpoint is never
damaged.

Layout under ``<output>/checkpoints/``: ``ckpt-<step:08d>.pt`` (the last ``keep_last`` are
kept) and ``best.pt`` (a hard link to, or a copy of, the checkpoint with the best
validation top-1; the link is itself made atomically).

A checkpoint is a dict (loadable with ``torch.load(weights_only=True)``):
``format``, ``version``, ``model`` (state dict), ``model_name``, ``model_class``, ``ema``,
``optimizer``, ``scheduler``, ``scaler``, ``rng`` (python, numpy, torch, cuda),
``epoch``, ``step_in_epoch`` (the next step to run in ``epoch``), ``global_step``,
``best_top1``, ``metrics`` (last validation), ``config`` (the resolved TrainConfig).
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "atomic_write_bytes", "atomic_torch_save", "CheckpointManager", "rng_state", "set_rng_state",
    "load_checkpoint_file", "CheckpointError", "FORMAT",
]

FORMAT = "fastvis-train-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """An unreadable or unsuitable checkpoint (one line)."""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (tmp file, fsync, rename, fsync dir)."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _atomic_link(src: str, dst: str) -> None:
    """dst becomes the same file as src (hard link, else a copy), atomically."""
    tmp = _tmp_name(dst)
    try:
        os.unlink(tmp)
    except OSError:
        pass
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as f:
            data = f.read()
        atomic_write_bytes(dst, data)
        return
    os.replace(tmp, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))


# --------------------------------------------------------------------------- RNG


def rng_state() -> Dict[str, Any]:
    """The global RNG states (python, numpy, torch, CUDA), in weights_only-loadable types."""
    ver, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {
        "python": [ver, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    ver, internal, gauss = st["python"]
    random.setstate((ver, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --------------------------------------------------------------------------- files


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Loads a file saved by torch (weights only: no code runs); ``CheckpointError`` with the
    reason if it cannot be read."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory (give a .pt file, or --resume the run directory)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"cannot read checkpoint {path}: {msg[:300]}") from None


class CheckpointManager:
    """Saves numbered checkpoints atomically, keeps the last ``keep_last`` and ``best.pt``."""

    def __init__(self, directory: str, keep_last: int = 2, clean: bool = True):
        self.directory = directory
        self.keep_last = max(1, int(keep_last))
        if clean:
            os.makedirs(directory, exist_ok=True)
            self.clean_stale()

    def clean_stale(self) -> None:
        """Removes temporary files of writes a killed process never finished."""
        for p in glob.glob(os.path.join(self.directory, ".*.tmp-*")):
            try:
                os.unlink(p)
            except OSError:
                pass

    def path_for(self, global_step: int) -> str:
        return os.path.join(self.directory, f"ckpt-{global_step:08d}.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.directory, "best.pt")

    def list(self) -> List[Tuple[int, str]]:
        """(global_step, path) of the numbered checkpoints, newest first."""
        out = []
        for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
            m = _NAME.match(name)
            if m:
                out.append((int(m.group(1)), os.path.join(self.directory, name)))
        return sorted(out, reverse=True)

    def save(self, state: Dict[str, Any], global_step: int, is_best: bool = False) -> str:
        path = self.path_for(global_step)
        atomic_torch_save(state, path)
        if is_best:
            _atomic_link(path, self.best_path)
        for _, old in self.list()[self.keep_last:]:
            try:
                os.unlink(old)
            except OSError:
                pass
        return path

    def latest(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """(path, state) of the newest checkpoint that loads, or None."""
        for _, path in self.list():
            try:
                st = load_checkpoint_file(path)
            except CheckpointError:
                continue
            if isinstance(st, dict) and st.get("format") == FORMAT:
                return path, st
        return None
