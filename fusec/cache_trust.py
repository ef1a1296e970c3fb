"""Whether a directory may hold code fusec will run, and the cache's lock.

Numba's cache files are pickles: loading one runs whatever code it names. fusec records their checksums
after its kernels ran and checks them before Numba reads them, but a record is evidence only if nobody
else could have written it. So a cache directory is used only when it and the files in it can be written
by this user alone, the rule ssh applies to ~/.ssh: the directory is owned by this user and not writable
by group or others, and every directory above it is owned by this user or root and not writable by
group or others unless sticky (like /tmp, where others cannot rename what is ours).
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time

LOCK_NAME = ".fusec.lock"
LOCK_TIMEOUT = 30.0  # seconds; the lock is held only to write or check a few small files


class CacheLocked(OSError):
    """The cache's lock could not be taken within LOCK_TIMEOUT."""


def current_uid() -> int | None:
    """This user's id (None where there are no user ids: nothing to check)."""
    return os.getuid() if hasattr(os, "getuid") else None


def untrusted(path: str) -> str | None:
    """Why the existing directory `path` cannot be trusted to hold only this user's files, or None."""
    uid = current_uid()
    if uid is None:
        return None
    why = _symlinks(os.path.abspath(path), uid)
    if why:
        return why
    path = os.path.realpath(path)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid != uid:
        return f"it is owned by uid {st.st_uid}, not by you (uid {uid})"
    if st.st_mode & 0o022:
        return f"it is writable by others (mode {st.st_mode & 0o7777:04o})"
    parent = os.path.dirname(path)
    while parent != path:
        path, st = parent, os.stat(parent)
        if st.st_uid not in (uid, 0):
            return f"{path} above it is owned by uid {st.st_uid}, not by you (uid {uid}) or root"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{path} above it is writable by others (mode {st.st_mode & 0o7777:04o})"
        parent = os.path.dirname(path)
    return None


def _symlinks(path: str, uid: int) -> str | None:
    """The directories checked are the real ones; a symbolic link on the way there must be one only this
    user or root can change: owned by one of them, in a directory others cannot write (or sticky)."""
    parts = path.split(os.sep)
    for k in range(2, len(parts) + 1):
        link = os.sep.join(parts[:k])
        st = os.lstat(link)
        if not stat.S_ISLNK(st.st_mode):
            continue
        if st.st_uid not in (uid, 0):
            return f"the link {link} on its path is owned by uid {st.st_uid}, not by you (uid {uid}) or root"
        above = os.stat(os.path.dirname(link))
        if above.st_mode & 0o022 and not above.st_mode & stat.S_ISVTX:
            return f"the link {link} on its path is in a directory writable by others"
    return None


def unusable(path: str) -> str | None:
    """Why `path` cannot be the cache directory, or None once it exists (created private, 0700), is
    trusted and writable."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        why = untrusted(path)
        if why:
            return why
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return None
    except OSError as e:
        return f"it is not writable ({e.strerror or e})"


@contextlib.contextmanager
def locked(directory: str):
    """An advisory lock on the cache directory (fcntl; a no-op where that does not exist). The lock file
    is 0600, so no other user can hold it; CacheLocked past LOCK_TIMEOUT instead of waiting forever."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:  # made by an older fusec: readable by others
            os.fchmod(fd, 0o600)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CacheLocked(f"the compile cache in {directory} is locked ({path}) by another process "
                                      f"for more than {LOCK_TIMEOUT:g} s") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
