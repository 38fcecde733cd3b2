"""Asynchronous file I/O of tensors: the Python face of the native engine (csrc/fuyou/engine.cpp).

`IOEngine.read` / `IOEngine.write` start a transfer of a host tensor's bytes to or from a file (or a file striped
over several directories, one per SSD) and return an `IOFuture` at once. Any size, any storage offset and any file
offset work: the engine aligns internally. Whatever goes wrong surfaces from `IOFuture.wait()` as a
`FuyouIOError` that names the file, offset, size and errno; no transfer ends with fewer bytes than asked, and
(with `io.verify`) no read returns bytes other than the ones this engine wrote there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from deepspeed_fuyou.config.io_options import ALIGNMENT, IOOptions
from deepspeed_fuyou.errors import FuyouConfigError, FuyouIOError
from deepspeed_fuyou.io import native
from deepspeed_fuyou.trace import TRACE

log = logging.getLogger(__name__)


CHECKSUM_BYTES_PER_CHUNK = 5
"""Host bytes `io.verify` keeps per 4 KiB of each file the engine writes: a CRC32C and a "known" flag
(csrc/fuyou/checksums.h)."""


def checksum_table_bytes(file_bytes: int) -> int:
    """Host memory the checksums of `file_bytes` of written files take (with `io.verify` on)."""
    return -(-file_bytes // ALIGNMENT) * CHECKSUM_BYTES_PER_CHUNK


# Directories already announced as lacking O_DIRECT: the fallback is logged once per directory, not per request.
_announced_fallback_dirs: set[str] = set()


CORRUPTION_FIX = (
    "the bytes on the SSD changed after fuyou wrote them, and nothing was computed from them: check the disk "
    "(dmesg, smartctl) and that nothing else writes to the swap directories, then resume from the last checkpoint"
)


class IOFuture:
    """Completion handle of one transfer. The tensor stays referenced until the transfer is over."""

    def __init__(
        self,
        request: native.Request,
        tensor: torch.Tensor,
        paths: list[str],
        offset: int,
        is_write: bool,
        copy_back_to: torch.Tensor | None = None,
    ) -> None:
        self._request = request
        self._is_write = is_write
        self._tensor = tensor
        self._paths = paths
        self._offset = offset
        self._copy_back_to = copy_back_to  # a non-contiguous read target, filled from `tensor` on completion
        self._checked = False

    def done(self) -> bool:
        """Whether the transfer has finished (successfully or not); never blocks."""
        return self._request.done()

    def wait(self, timeout: float | None = None) -> int:
        """Blocks until the transfer finished and returns its byte count.

        Raises FuyouIOError if any part failed, TimeoutError if `timeout` seconds pass first.
        """
        if not self._request.wait(-1.0 if timeout is None else timeout):
            raise TimeoutError(f"I/O on {self._paths[0]} did not finish within {timeout} s")
        self._raise_error()  # on every wait: whoever waits for a failed transfer learns of it
        if not self._checked:
            self._checked = True
            self._announce_fallback()
            TRACE.record(
                "ssd write" if self._is_write else "ssd read",
                os.path.basename(self._paths[0]),
                self._request.submitted_ns,
                self._request.finished_ns,
                self._request.nbytes,
            )
            if self._copy_back_to is not None:
                self._copy_back_to.copy_(self._tensor)
        return self._request.nbytes

    def _raise_error(self) -> None:
        error = self._request.error()
        if error is None:
            return
        errno, path, offset, nbytes, what = error
        if what == "open":  # the open failed before any block existed: report the transfer as the caller saw it
            offset, nbytes = self._offset, self._request.nbytes
            what = f"opening for {'writing' if self._is_write else 'reading'}"
        fix = CORRUPTION_FIX if what.startswith("checksum mismatch") else None
        raise FuyouIOError(path, offset, nbytes, errno, what, fix)

    def _announce_fallback(self) -> None:
        if not self._request.used_buffered_fallback:
            return
        for path in self._paths:
            directory = os.path.dirname(os.path.abspath(path))
            if directory not in _announced_fallback_dirs:
                _announced_fallback_dirs.add(directory)
                log.warning("fuyou: %s does not support O_DIRECT; using buffered pread/pwrite there", directory)


class IOEngine:
    """Worker threads that move tensors between host memory and files, many transfers in flight at once."""

    def __init__(self, options: IOOptions | None = None) -> None:
        self.options = options or IOOptions()
        self._engine = self._start(self.options)
        self.backend: str = self._engine.backend

    @staticmethod
    def _start(options: IOOptions) -> native.Engine:
        def start(backend: str) -> native.Engine:
            return native.Engine(
                backend,
                options.block_size,
                options.queue_depth,
                options.threads,
                buffered_fallback=options.engine == "auto",
                verify=options.verify,
            )

        if options.engine == "io_uring" and not native.io_uring_compiled():
            raise FuyouConfigError(
                f"{options.json_path}.engine",
                "io_uring",
                "this build has no io_uring support",
                "install liburing-dev and rebuild, or use 'auto'",
            )
        if options.engine != "auto":
            try:
                return start(options.engine)
            except RuntimeError as err:
                raise FuyouConfigError(
                    f"{options.json_path}.engine",
                    options.engine,
                    f"the kernel refused it ({err})",
                    "use 'auto', which falls back to 'threads', or raise fs.aio-max-nr",
                ) from err
        try:
            return start("aio")
        except RuntimeError as err:
            log.warning("fuyou: Linux AIO is unavailable (%s); using the pread/pwrite thread engine", err)
            return start("threads")

    def write(
        self, tensor: torch.Tensor, path: str | Sequence[str], offset: int = 0, stripe_size: int | None = None
    ) -> IOFuture:
        """Starts writing the bytes of `tensor` at `offset` of `path` (striped when a list of several is given).

        A non-contiguous tensor is written as its contiguous copy, made here.
        """
        tensor = _host(tensor, "write")
        tensor = tensor if tensor.is_contiguous() else tensor.contiguous()
        return self._submit(True, tensor, path, offset, stripe_size, None)

    def read(
        self, tensor: torch.Tensor, path: str | Sequence[str], offset: int = 0, stripe_size: int | None = None
    ) -> IOFuture:
        """Starts filling `tensor` with its byte size from `offset` of `path` (striped over several paths).

        A non-contiguous target is read into a contiguous buffer and copied into place by `wait()`.
        """
        tensor = _host(tensor, "read into")
        if tensor.is_contiguous():
            return self._submit(False, tensor, path, offset, stripe_size, None)
        return self._submit(
            False, torch.empty_like(tensor, memory_format=torch.contiguous_format), path, offset, stripe_size, tensor
        )

    def _submit(
        self,
        is_write: bool,
        tensor: torch.Tensor,
        path: str | Sequence[str],
        offset: int,
        stripe_size: int | None,
        copy_back_to: torch.Tensor | None,
    ) -> IOFuture:
        if self._engine is None:
            raise RuntimeError("this IOEngine is closed")
        paths = [os.fspath(path)] if isinstance(path, str | os.PathLike) else [os.fspath(p) for p in path]
        stripe = self.options.block_size if stripe_size is None else stripe_size
        request = self._engine.submit(is_write, paths, stripe, tensor, offset)
        return IOFuture(request, tensor, paths, offset, is_write, copy_back_to)

    @property
    def bytes_read(self) -> int:
        return self._engine.bytes_read

    @property
    def bytes_written(self) -> int:
        return self._engine.bytes_written

    @property
    def checksummed_bytes(self) -> int:
        """Bytes of the files whose checksums the engine holds (0 with `io.verify` off)."""
        return self._engine.checksummed_bytes

    def forget_checksums(self, paths: Sequence[str]) -> None:
        """Forgets what this engine wrote to `paths`: someone else has replaced those files (a checkpoint copied
        into place), so their bytes are no longer the engine's to check."""
        for path in paths:
            self._engine.forget_checksums(os.fspath(path))

    @property
    def bounce_bytes(self) -> int:
        """Host memory the workers hold for transfers of unaligned memory (allocated lazily, bounded)."""
        return self._engine.bounce_bytes

    def close(self) -> None:
        """Finishes every started transfer, then stops the workers."""
        self._engine = None  # the native destructor drains and joins

    def __enter__(self) -> IOEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host(tensor: torch.Tensor, verb: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"can only {verb} a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(
            f"the I/O engine moves host memory and cannot {verb} a tensor on {tensor.device}: use "
            "deepspeed_fuyou.io.DeviceTransfer, which stages device memory through pinned buffers"
        )
    return tensor
