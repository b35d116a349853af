"""Output folders that are never lost, mixed or written by two processes at once.

- :class:`FolderLock`: one writer per folder. The lock is a hidden sibling file
  ``<parent>/.<name>.lock`` (a sibling, so it survives the folder being renamed or replaced),
  created with ``O_CREAT | O_EXCL`` and holding ``{"pid", "host", "started"}``. A lock whose
  process is gone (same host, pid not alive) is stale: it is taken over with a message.
- :func:`staged_folder`: a stage (identification, inference) writes into a temporary sibling
  ``<parent>/.<name>.tmp-XXXX`` that replaces ``<name>`` only when the stage succeeded; a killed
  or failed stage leaves the old complete folder (plus a hidden temp folder, removed by the next
  run) and never a mixture of old and new files.
- :func:`move_aside` / :func:`restore`: ``--overwrite`` renames the old run to
  ``<parent>/.<name>.old-<stamp>`` instead of deleting it; it is deleted only once the new run
  has written its first checkpoint, and renamed back if the new attempt fails before that.
- :func:`safe_file_names`: file names made from pair ids (no separators, no ``..``, no leading
  dot, collisions made unique).

Standard library only.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Dict, Iterator, Optional, Sequence


def _sibling(folder: str, tag: str) -> str:
    folder = os.path.abspath(folder.rstrip(os.sep) or os.sep)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.{tag}")


def lock_path(folder: str) -> str:
    """The lock file of ``folder``: ``<parent>/.<name>.lock``."""
    return _sibling(folder, "lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLockedError(OSError):
    """Another live process writes the folder."""


class FolderLock:
    """Exclusive writer lock of one folder (a context manager; see the module docstring).

    ``FolderLock(folder, what="run folder").acquire()`` raises :class:`FolderLockedError` naming
    the lock file and its holder (pid, host, start time) if a live process holds it; a stale
    lock (dead pid on this host) is taken over and ``log`` says so. ``release()`` removes the
    file if it is still ours.
    """

    def __init__(self, folder: str, what: str = "folder", log=print):
        self.folder, self.what, self.log = folder, what, log
        self.path = lock_path(folder)
        self.held = False
        self._token = ""

    def _create(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "folder": os.path.abspath(self.folder)}
        self._token = json.dumps(info, sort_keys=True)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._token + "\n")
        return True

    def _holder(self) -> Optional[Dict]:
        try:
            with open(self.path) as fh:
                info = json.load(fh)
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "FolderLock":
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            info = self._holder()
            if info is None:
                raise FolderLockedError(
                    f"{self.folder}: {self.what} is locked by {self.path}, which is unreadable; if no process "
                    f"writes {self.folder}, delete {self.path} and retry")
            here = info.get("host") == socket.gethostname()
            pid = int(info.get("pid", -1))
            if here and not _pid_alive(pid):
                self.log(f"[lock] {self.path}: stale lock of process {pid} (started {info.get('started')}, no longer "
                         f"running) taken over")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            raise FolderLockedError(
                f"{self.folder}: {self.what} is being written by process {pid} on host {info.get('host')} "
                f"(started {info.get('started')}; lock {self.path}); wait for it to finish or choose another "
                f"--out (if that process is not writing here, e.g. its pid was reused, delete {self.path})")
        raise FolderLockedError(f"{self.folder}: could not take the lock {self.path}; retry")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path) as fh:
                mine = fh.read().strip() == self._token
        except OSError:
            return
        if mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- staged stage outputs ------------------------------------------------------------------
def remove_stale_temps(folder: str) -> None:
    """Delete ``.<name>.tmp-*`` siblings left by killed runs (call while holding the lock)."""
    folder = os.path.abspath(folder)
    parent, prefix = os.path.dirname(folder), f".{os.path.basename(folder)}.tmp-"
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith(prefix):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def replace_folder(tmp: str, folder: str) -> None:
    """Put the complete folder ``tmp`` at ``folder``; the old ``folder`` (if any) is deleted.

    Between the two renames ``folder`` is briefly absent, never a mixture of old and new files.
    """
    old = None
    if os.path.lexists(folder):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(folder))}.tmp-",
                               dir=os.path.dirname(os.path.abspath(folder)))
        os.rmdir(old)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(folder: str, what: str = "output folder", log=print) -> Iterator[str]:
    """Lock ``folder``, yield a fresh temporary sibling to write into, and on success replace
    ``folder`` by it (files of an earlier run never survive); on any error (or a kill) the old
    ``folder`` stays as it was and the temporary folder is removed (or, after a kill, removed
    by the next run). File permissions follow the umask (the folder itself: 0o777 & ~umask)."""
    folder = os.path.abspath(folder)
    with FolderLock(folder, what, log):
        remove_stale_temps(folder)
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_folder(tmp, folder)


# ---- --overwrite: move the old run aside -------------------------------------------------------
def move_aside(folder: str) -> str:
    """Rename ``folder`` to a hidden sibling ``.<name>.old-<stamp>`` and return its path."""
    folder = os.path.abspath(folder)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = _sibling(folder, f"old-{stamp}-{os.getpid()}")
    os.replace(folder, aside)
    return aside


def restore(aside: str, folder: str) -> None:
    """Undo :func:`move_aside`: whatever a failed attempt left in ``folder`` is deleted first."""
    folder = os.path.abspath(folder)
    if os.path.lexists(folder):
        shutil.rmtree(folder) if os.path.isdir(folder) and not os.path.islink(folder) else os.remove(folder)
    os.replace(aside, folder)


# ---- file names from pair ids -------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_file_name(text: str) -> str:
    """``text`` made into one file-name component: runs of characters outside ``[A-Za-z0-9._+-]``
    (path separators included) become ``_``, ``..`` becomes ``_``, leading dots are dropped,
    at most 100 characters; never empty."""
    name = _UNSAFE.sub("_", str(text)).replace("..", "_").lstrip(".")
    return name[:100] or "_"


def safe_file_names(ids: Sequence[str]) -> Dict[str, str]:
    """``{id: file-name component}`` for every id; ids that collide after :func:`safe_file_name`
    (e.g. ``a/b`` and ``a_b``) get ``-<8 hex digits of sha1(id)>`` appended, so names stay unique."""
    base = {i: safe_file_name(i) for i in ids}
    counts: Dict[str, int] = {}
    for name in base.values():
        key = name.lower()  # case-insensitive file systems
        counts[key] = counts.get(key, 0) + 1
    out = {}
    for i, name in base.items():
        if counts[name.lower()] > 1:
            name = f"{name}-{hashlib.sha1(str(i).encode()).hexdigest()[:8]}"
        out[i] = name
    return out

