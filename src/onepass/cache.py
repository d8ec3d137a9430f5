"""onepass's cache directory (~/.cache/onepass): converted GGUF models (gguf/), measured cost
curves (cost_curves.json), the CPU kernel builds (kernels/), and what `onepass train` keeps:
the targets' hidden states over its data and its checkpoints (train/), the heads it wrote
(heads/).

Several processes share it, so every write goes to a unique temporary name, is fsynced and then
renamed into place, and every read-modify-write or conversion holds a lock file (flock: the lock
dies with its process, so a crash never leaves the cache locked). Also the `onepass cache list`
and `onepass cache clear` commands.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from onepass.errors import OnepassError

MODELS_DIR = "gguf"
CURVES_FILE = "cost_curves.json"
KERNELS_DIR = "kernels"
MARKER = "complete"
"""The file a converted model's directory is complete with (JSON: format, source, files)."""
FEATURES_DIR = "train/features"
"""The targets' hidden states over the training data (onepass.train.features)."""
RUNS_DIR = "train/runs"
"""Training checkpoints (onepass.train.loop)."""
HEADS_DIR = "heads"
"""Heads `onepass train` wrote, found by the medusa and eagle drafters."""
GROUPS = ("models", "curves", "kernels", "training", "heads")


class CacheError(OnepassError):
    """The cache directory could not be read or cleared."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "onepass"


def lock_path(path: Path) -> Path:
    """The lock file guarding `path` (a file or a directory): `path` + ".lock"."""
    return path.with_name(path.name + ".lock")


@contextmanager
def locked(lock: Path, *, shared: bool = False, wait_note: str | None = None) -> Iterator[None]:
    """Hold an flock on the file `lock` (created if missing): shared for readers, exclusive for
    writers. Prints `wait_note` on stderr if another process makes us wait."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_note:
                    print(wait_note, file=sys.stderr, flush=True)
                    wait_note = None
                fcntl.flock(fd, mode)
            # `cache clear` deletes lock files (while holding them): if ours was deleted while
            # we waited, it no longer guards anything and we must lock the new one.
            if _same_file(fd, lock):
                yield
                return
        finally:
            os.close(fd)


def try_locked(lock: Path) -> int | None:
    """An exclusive lock's file descriptor (close it to unlock), or None if another process
    holds the lock."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not _same_file(fd, lock):  # deleted under us: retry on the new file
        os.close(fd)
        return try_locked(lock)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory's: its names) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories: before renaming it into place,
    so a power cut cannot leave a renamed entry with empty or short files."""
    for path in sorted(directory.rglob("*"), key=lambda p: p.is_dir()):
        fsync_path(path)
    fsync_path(directory)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path`'s contents by `text`: readers see the old file or the new one, never a
    part; a unique temporary name, so concurrent writers never write into each other's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_path(path.parent)


def read_entries(path: Path) -> tuple[dict[str, Any], str | None]:
    """A JSON object file of entries by key (measurements cached per model and machine): its
    entries, and what is wrong with it if it is damaged (then {}, and rewritten whole by the
    next store_entry). A missing file has no entries and nothing wrong."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        return {}, f"{type(e).__name__}: {e}"
    if not isinstance(entries, dict):
        return {}, "not a JSON object"
    return entries, None


def store_entry(path: Path, key: str, value: Any) -> None:
    """Add or replace one entry of a read_entries file, under its lock: the file is read again
    under it, so an entry another process added meanwhile is kept."""
    with locked(lock_path(path)):
        entries, _ = read_entries(path)
        entries[key] = value
        write_atomically(path, json.dumps(entries, indent=1))


# -- `onepass cache` --------------------------------------------------------------------------


@dataclass
class CacheItem:
    group: str
    """One of GROUPS: what `onepass cache clear --<group>` removes."""
    kind: str
    path: Path
    size: int
    """Bytes."""
    source: str
    """What it was made from."""
    last_used: float
    """Seconds since the epoch."""
    lock: Path | None = None
    """The lock a process holds while writing it; taken before removing it."""


def cache_items(root: Path) -> list[CacheItem]:
    """Everything in the cache directory `root`."""
    items = _model_items(root / MODELS_DIR)
    for path in sorted(root.glob("cost_curves*")):
        if path.name == CURVES_FILE:
            curves = _count_curves(path)
            items.append(_item("curves", "cost curves", path, curves, lock_path(path)))
        elif path.suffix == ".tmp":
            items.append(_item("curves", "cost curves (partial write)", path, ""))
    kernels = root / KERNELS_DIR
    for path in sorted(kernels.iterdir()) if kernels.is_dir() else []:
        items.append(_item("kernels", "kernels", path, path.name))
    for group, kind, folder in (
        ("training", "training hidden states", FEATURES_DIR),
        ("training", "training checkpoint", RUNS_DIR),
        ("heads", "trained heads", HEADS_DIR),
    ):
        directory = root / folder
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            items.append(_item(group, kind, path, path.name))
    return items


def _model_items(models: Path) -> list[CacheItem]:
    from onepass.models.loading import CACHE_FORMAT

    items = []
    for path in sorted(models.iterdir()) if models.is_dir() else []:
        if not path.is_dir():
            continue  # lock files, removed with their entry
        if path.name.startswith("."):  # ".<entry>.tmp-*": a conversion running or killed
            entry, tmp, _ = path.name[1:].partition(".tmp-")
            lock = lock_path(models / entry) if tmp else None  # None: an older onepass's
            items.append(_item("models", "partial conversion", path, "", lock))
            continue
        marker = _read_marker(path / MARKER)
        if marker.get("format") == CACHE_FORMAT:
            kind = "converted model"
        else:
            kind = "converted model (old format)" if marker else "converted model (incomplete)"
        item = _item("models", kind, path, str(marker.get("source", "")), lock_path(path))
        with suppress(FileNotFoundError):  # the marker's time is refreshed by each load
            item.last_used = (path / MARKER).stat().st_mtime
        items.append(item)
    return items


def _read_marker(path: Path) -> dict:
    try:
        text = path.read_text()
    except (OSError, ValueError):
        return {}
    try:
        marker = json.loads(text)
    except ValueError:
        return {"source": text.strip()}  # the first format: the source path as text
    return marker if isinstance(marker, dict) else {"source": ""}


def _count_curves(path: Path) -> str:
    try:
        count = len(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return "unreadable"
    return f"{count} curve{'' if count == 1 else 's'}"


def _item(group: str, kind: str, path: Path, source: str, lock: Path | None = None) -> CacheItem:
    stats = []
    for file in [path, *path.rglob("*")]:
        with suppress(FileNotFoundError):  # a conversion may rename its directory meanwhile
            stats.append(file.stat())
    size = sum(s.st_size for s in stats if not stat.S_ISDIR(s.st_mode))
    last_used = max((s.st_mtime for s in stats), default=0.0)
    return CacheItem(group, kind, path, size, source, last_used, lock)


def clear_cache(root: Path, groups: set[str], out: TextIO | None = None) -> int:
    """Remove the cache's items of `groups`, printing each (on stdout by default); return the
    bytes freed. An item another process may be writing is skipped, with a note."""
    out = out or sys.stdout
    freed, failed = 0, []
    for item in cache_items(root):
        if item.group not in groups:
            continue
        busy = _busy(item)
        fd = None if busy or item.lock is None else try_locked(item.lock)
        if busy or (item.lock is not None and fd is None):
            print(f"skipped {item.path}: {busy or 'another process is using it'}", file=out)
            continue
        try:
            _remove(item.path)
            if item.lock is not None:  # ours while we hold it; `locked` copes with its removal
                item.lock.unlink(missing_ok=True)
        except OSError as e:
            failed.append(item.path)
            print(f"could not remove {item.path} ({e})", file=out)
            continue
        finally:
            if fd is not None:
                os.close(fd)
        freed += item.size
        print(f"removed {item.kind} {item.path} ({item.size / 1e6:.1f} MB)", file=out)
    if "models" in groups:
        _remove_unused_locks(root / MODELS_DIR)
    if "curves" in groups:
        _remove_unused_locks(root)
    print(f"freed {freed / 1e6:.1f} MB in {root}", file=out)
    if failed:
        raise CacheError(f"{len(failed)} cache item(s) could not be removed, e.g. {failed[0]}")
    return freed


def _busy(item: CacheItem) -> str | None:
    """Why an item without a lock of ours may be in use right now, if it may."""
    # torch's build lock, in one of the per-ISA build directories (kernels/torch-<v>/<isa>/)
    if item.group == "kernels" and any(item.path.glob("*/lock")):
        return "a kernel build is running (or was killed: then delete it by hand)"
    recent = time.time() - item.last_used < 600
    if item.kind == "partial conversion" and item.lock is None and recent:
        return "an older onepass may be converting into it (or it was killed: retry later)"
    return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def _remove_unused_locks(directory: Path) -> None:
    for lock in directory.glob("*.lock") if directory.is_dir() else []:
        fd = try_locked(lock)
        if fd is not None:  # held by nobody: no process is using what it guards
            lock.unlink(missing_ok=True)
            os.close(fd)


def format_items(items: list[CacheItem], root: Path) -> str:
    if not items:
        return f"the cache {root} is empty"
    lines = [f"{'kind':<30} {'MB':>8}  {'last used':<16}  path  (source)"]
    for item in items:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.last_used))
        source = f"  ({item.source})" if item.source else ""
        lines.append(f"{item.kind:<30} {item.size / 1e6:>8.1f}  {when:<16}  {item.path}{source}")
    total = sum(item.size for item in items)
    lines.append(f"total {total / 1e6:.1f} MB in {root}")
    return "\n".join(lines)


def cmd_cache_list(args: argparse.Namespace) -> None:
    root = _root(args)
    print(format_items(cache_items(root), root))


def cmd_cache_clear(args: argparse.Namespace) -> None:
    chosen = {group for group in GROUPS if getattr(args, group)}
    clear_cache(_root(args), set(GROUPS) if args.all or not chosen else chosen)


def _root(args: argparse.Namespace) -> Path:
    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise CacheError(f"--cache-dir {root} is not a directory")
    return root


def add_cache_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `onepass cache list` and `onepass cache clear`."""
    p = subparsers.add_parser(
        "cache",
        help="list or clear onepass's cache (converted models, cost curves, kernels, training)",
        description="onepass caches converted GGUF models, measured cost curves and its CPU "
        "kernel builds; all are rebuilt when needed.",
    )
    actions = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        default=None,
        help=f"the cache directory (default: {default_cache_dir()})",
    )
    ls = actions.add_parser(
        "list", parents=[common], help="each item: kind, size, last use, path, source"
    )
    ls.set_defaults(func=cmd_cache_list)
    clear = actions.add_parser(
        "clear",
        parents=[common],
        help="remove items (default: all); items in use by another process are skipped",
    )
    clear.add_argument("--models", action="store_true", help="converted models")
    clear.add_argument("--curves", action="store_true", help="measured cost curves")
    clear.add_argument("--kernels", action="store_true", help="CPU kernel builds")
    clear.add_argument(
        "--training",
        action="store_true",
        help="onepass train's hidden states and checkpoints (a training then starts over)",
    )
    clear.add_argument("--heads", action="store_true", help="heads onepass train wrote")
    clear.add_argument("--all", action="store_true", help="everything (the default)")
    clear.set_defaults(func=cmd_cache_clear)
    return p
