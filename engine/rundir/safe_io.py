"""Opening, writing and removing inside a run, sweep or queue folder without ever leaving it.

The policy (docs/safety.md), in one place, for everything zopro writes, cleans or signals:

- The folder zopro is given (a run directory, a sweep directory, the queue's root) may itself be reached
  through a symbolic link: that is the user's choice (a bigger disk). Inside it, zopro follows no link
  when it writes, appends, truncates, changes a mode, removes or obeys.
- Sub-folders it writes into (control/, checkpoints/, samples/, .queue/items, ...) must be real folders;
  a link there is refused with one sentence, and nothing is written.
- Files kept open and written in place (lock, events.jsonl, the queue's locks and logs) are opened with
  O_NOFOLLOW and must be plain files with no second name (a hard link to a file elsewhere is refused).
- Whole files (status.json, heartbeat, recipe.toml, summary.json, queue items, ...) are written to a new
  temporary name (O_CREAT|O_EXCL|O_NOFOLLOW) and renamed over the target: a rename replaces a link, it
  never writes through one.
- Removing: a link is unlinked (never its target), a folder goes with `shutil.rmtree`, which does not
  follow links inside it; zopro removes only what it names itself (its temporaries, control requests it
  takes, a run folder it created and never started).
- Reading: plain files only, opened without blocking, so a FIFO or a device where a file belongs is
  "not a plain file" instead of a hang; no link is followed inside the folder (a copied run folder must not
  show, copy or load a file from elsewhere: a report, an export, a resume).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
READ_LINK = "is a symbolic link; zopro reads nothing through links inside its folders"
CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def unsafe(path: Path, what: str) -> OSError:
    """The one error every refusal raises: an OSError naming the path, so callers that report a folder
    that cannot be written report this too."""
    return OSError(errno.ELOOP if "link" in what else errno.EINVAL, what, str(path))


def real_folder(path: Path, *, create: bool = True, mode: int = 0o755) -> Path:
    """`path` as a real folder (created when missing and `create`); OSError when it is a link or a file."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
        info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise unsafe(
            path, "is a symbolic link; zopro writes nothing through links inside its folders"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, "not a folder", str(path))
    return path


def _lstat_mode(path: Path) -> int:
    """The entry's own mode (a link's, not its target's); 0 when it cannot be had (missing)."""
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def is_link(path: Path) -> bool:
    return stat.S_ISLNK(_lstat_mode(path))


def is_real_dir(path: Path) -> bool:
    """A folder, not a link to one."""
    return stat.S_ISDIR(_lstat_mode(path))


def is_plain_file(path: Path) -> bool:
    """A plain file, not a link, a FIFO or a device."""
    return stat.S_ISREG(_lstat_mode(path))


def open_in_place(path: Path, flags: int, mode: int = 0o644) -> int:
    """A descriptor for a file written in place (appended, truncated, locked): never through a link,
    only a plain file with one name."""
    try:
        fd = os.open(path, flags | NO_FOLLOW | CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise unsafe(
                path, "is a symbolic link; zopro writes nothing through links inside its folders"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise unsafe(path, "is not a plain file")
        if info.st_nlink > 1:
            raise unsafe(path, "has a second name (a hard link); zopro writes only files of its own")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_text_in_place(path: Path, flags: int = os.O_RDWR | os.O_CREAT):
    """`open_in_place` as a text file object (read and write, not truncated)."""
    return os.fdopen(open_in_place(path, flags), "r+", encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file under a new temporary name, then rename it over the target: readers see the old
    file or the new one, never half of one, and a link at either name is replaced, never written through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # ours, left by a crash (a link there is removed, not followed)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW | CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk leaves no half-written temporary behind
        raise


def remove_entry(path: Path) -> None:
    """Remove a file, a link (never its target) or a folder (without following links inside); missing is fine."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def open_plain(path: Path):
    """A plain file opened for reading (binary): FileNotFoundError when missing, OSError when it is a link, a
    FIFO, a device or a folder (opened without blocking: never a hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NO_FOLLOW | CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise unsafe(path, READ_LINK) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a plain file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_plain(path: Path, limit: int | None = None) -> bytes:
    """A plain file's bytes (at most `limit`); see `open_plain`."""
    with open_plain(path) as handle:
        return handle.read() if limit is None else handle.read(limit)


def checked_inside(root: Path, path: Path) -> Path:
    """`path`, a file below the folder `root`, checked part by part: the folders on the way are real folders
    and the file a plain file, no link anywhere below `root` (`root` itself may be one: the user's choice).
    FileNotFoundError when a part is missing, OSError naming the part that is a link or not a plain file."""
    root, path = Path(root), Path(path)
    current = root
    parts = path.relative_to(root).parts
    for index, part in enumerate(parts):
        current = current / part
        mode = os.lstat(current).st_mode
        if stat.S_ISLNK(mode):
            raise unsafe(current, READ_LINK)
        last = index == len(parts) - 1
        if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
            raise OSError(errno.EINVAL, "not a plain file" if last else "not a folder", str(current))
    return path


def read_inside(root: Path, path: Path, limit: int | None = None) -> bytes:
    """The bytes of a plain file below `root` (at most `limit`), through no link; see `checked_inside`."""
    return read_plain(checked_inside(root, path), limit)


def plain_tree(folder: Path) -> list[Path]:
    """The files below a real folder (a checkpoint), relative; OSError naming the folder when it is a link or
    not a folder, or the first link or special file inside it: one that holds either is never read."""
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode):
        raise unsafe(folder, READ_LINK)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, "not a folder", str(folder))
    found: list[Path] = []
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(parent) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                found.append(path.relative_to(folder))
            elif stat.S_ISLNK(mode):
                raise unsafe(path, READ_LINK)
            elif not stat.S_ISDIR(mode):
                raise unsafe(path, "is not a plain file (a FIFO, a socket or a device)")
    return found
