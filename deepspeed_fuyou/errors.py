"""The errors a user can hit. Each names what was wrong, where, and the fix, so no one has to read our source."""

from __future__ import annotations

import errno as errno_codes
import os


class FuyouError(Exception):
    """Base class of every error deepspeed-fuyou raises on purpose."""


class FuyouConfigError(FuyouError):
    """A setting that cannot work: the JSON path of the field, its value, why, and what to set instead."""

    def __init__(self, field: str, value: object, reason: str, fix: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.fix = fix
        super().__init__(f"{field} = {value!r}: {reason}. Fix: {fix}")


# What to do about the errors a swap directory typically produces.
_IO_FIXES = {
    errno_codes.ENOENT: "create the directory, or point fuyou.nvme_paths at an existing one",
    errno_codes.EACCES: "make the directory writable by this user, or choose another in fuyou.nvme_paths",
    errno_codes.EPERM: "make the directory writable by this user, or choose another in fuyou.nvme_paths",
    errno_codes.EROFS: "the file system is read-only: choose a writable directory in fuyou.nvme_paths",
    errno_codes.ENOSPC: "free space on that file system, or add another SSD to fuyou.nvme_paths",
    errno_codes.EDQUOT: "raise the disk quota, or add another SSD to fuyou.nvme_paths",
    errno_codes.EFBIG: "the file exceeds the process's file-size limit (ulimit -f) or the file system's maximum",
    errno_codes.EIO: "the device reported an error or the file is shorter than expected: check the disk and that "
    "nothing else modifies the swap files",
    errno_codes.EINVAL: "the file system rejected the request (O_DIRECT unsupported?): use io.engine 'threads'",
}


class FuyouIOError(FuyouError):
    """A file transfer that did not move every byte: which file, where, how much, and the errno."""

    def __init__(
        self, path: str, offset: int, nbytes: int, errno: int | None, reason: str, fix: str | None = None
    ) -> None:
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.errno = errno
        self.reason = reason
        self.fix = fix or _IO_FIXES.get(errno or 0, "check the device and the file")
        code = f"[Errno {errno}] {os.strerror(errno)}" if errno else "no errno"
        super().__init__(f"{reason}: {path} (offset {offset}, {nbytes} bytes): {code}. Fix: {self.fix}")
