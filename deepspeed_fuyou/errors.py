"""The errors a user can hit. Each names what was wrong, where, and the fix, so no one has to read our source."""

from __future__ import annotations

import errno as errno_codes
import os


class FuyouError(Exception):
    """Base class of every error deepspeed-fuyou raises on purpose."""


class FuyouConfigError(FuyouError, ValueError):
    """A setting that cannot work: the JSON path of the field, its value, why, and what to set instead.

    A config with several problems raises one error that lists them all (`problems`), so that a user fixes
    everything in one edit instead of one problem per launch; `field`, `value`, `reason` and `fix` are the first's.
    A ValueError too, so that pydantic collects it with the other problems of a config (see `config.schema`).
    """

    def __init__(self, field: str, value: object, reason: str, fix: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.fix = fix
        self.problems: list[FuyouConfigError] = [self]
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.field} = {self.value!r}: {self.reason}. Fix: {self.fix}"

    @classmethod
    def combine(cls, problems: list[FuyouConfigError]) -> FuyouConfigError:
        """One error for every problem found (at least one)."""
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        combined = cls(first.field, first.value, first.reason, first.fix)
        combined.problems = list(problems)
        combined.args = (f"{len(problems)} problems in the config:\n" + "\n".join(f"  {p.line()}" for p in problems),)
        return combined

    @property
    def fields(self) -> list[str]:
        return [problem.field for problem in self.problems]


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
