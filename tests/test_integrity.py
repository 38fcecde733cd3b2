"""End-to-end integrity: a byte that changed on the SSD after the engine wrote it fails the read that brings it back
(`io.verify`), naming the file, the 4 KiB it is in and both checksums; nothing the engine itself rewrote, and nothing
it did not write, is ever reported."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from benchlib import corrupt  # scripts/, on pytest's pythonpath

from deepspeed_fuyou.errors import FuyouIOError
from deepspeed_fuyou.io import IOEngine, IOOptions, native
from tests.conftest import make_engine

MiB = 1 << 20


def test_crc32c_is_the_castagnoli_checksum_of_iscsi_and_ext4() -> None:
    assert native.crc32c(b"123456789") == 0xE3069283
    assert native.crc32c(b"") == 0


def test_crc32c_of_a_host_tensor_is_that_of_its_bytes() -> None:
    values = torch.randn(3 * 4096 + 5)
    assert native.crc32c(values) == native.crc32c(values.numpy().tobytes())


def test_a_byte_changed_on_the_ssd_fails_the_read_naming_the_file_the_4kib_and_both_checksums(
    engine: IOEngine, tmp_path: Path
) -> None:
    target = tmp_path / "master"
    written = torch.arange(3 * MiB // 4, dtype=torch.float32)
    engine.write(written, target).wait()
    corrupt(target, MiB + 5000, b"\xff")
    with pytest.raises(FuyouIOError) as err:
        engine.read(torch.empty_like(written), target).wait()
    assert (err.value.errno, err.value.path) == (errno.EIO, str(target))
    assert (err.value.offset, err.value.nbytes) == (MiB + 4096, 4096)  # the chunk that holds the changed byte
    assert "checksum mismatch" in err.value.reason and "0x" in err.value.reason
    assert "resume from the last checkpoint" in str(err.value)
    unchanged = torch.empty(MiB // 4)
    engine.read(unchanged, target).wait()  # the first MiB is intact, and the engine goes on working
    assert torch.equal(unchanged, written[: MiB // 4])


def test_a_striped_read_of_part_of_a_write_checks_the_chunks_it_covers_in_the_right_member(tmp_path: Path) -> None:
    engine = make_engine("aio")
    paths = [tmp_path / "a", tmp_path / "b"]
    written = torch.arange(MiB, dtype=torch.float32)  # 4 MiB: stripes 0 and 2 in a, 1 and 3 in b
    engine.write(written, paths, stripe_size=MiB).wait()
    corrupt(paths[1], 8192, b"\x00" * 16)  # logical byte 1 MiB + 8192
    piece = torch.empty(16 * 1024)  # 64 KiB from logical 1 MiB: a part of what one write wrote
    with pytest.raises(FuyouIOError) as err:
        engine.read(piece, paths, offset=MiB, stripe_size=MiB).wait()
    assert (err.value.path, err.value.offset) == (str(paths[1]), 8192)
    engine.read(piece, paths, offset=2 * MiB, stripe_size=MiB).wait()
    assert torch.equal(piece, written[MiB // 2 : MiB // 2 + 16 * 1024])


def test_what_the_engine_rewrote_even_in_part_and_unaligned_is_never_reported(tmp_path: Path) -> None:
    engine = make_engine("aio")
    target = tmp_path / "t"
    values = torch.arange(MiB, dtype=torch.float32)
    engine.write(values, target).wait()
    values[10:20] = -1.0  # bytes 40..80: the head of a chunk, written through the buffered descriptor
    engine.write(values[10:20].clone(), target, offset=40).wait()
    values[MiB // 2 :] = 7.0
    engine.write(values[MiB // 2 :].clone(), target, offset=2 * MiB).wait()
    back = torch.empty_like(values)
    engine.read(back, target).wait()
    assert torch.equal(back, values)


def test_files_replaced_by_someone_else_are_checked_only_until_forgotten(tmp_path: Path) -> None:
    engine = make_engine("aio")
    target = tmp_path / "checkpoint-file"
    engine.write(torch.zeros(MiB), target).wait()
    target.write_bytes(torch.ones(MiB).numpy().tobytes())  # e.g. a checkpoint copied into place
    with pytest.raises(FuyouIOError, match="checksum mismatch"):
        engine.read(torch.empty(MiB), target).wait()
    engine.forget_checksums([str(target)])
    back = torch.empty(MiB)
    engine.read(back, target).wait()
    assert torch.equal(back, torch.ones(MiB))


def test_with_verify_off_the_engine_returns_whatever_the_ssd_holds(tmp_path: Path) -> None:
    engine = IOEngine(IOOptions(verify=False))
    target = tmp_path / "t"
    engine.write(torch.zeros(MiB), target).wait()
    corrupt(target, 0, b"\x01\x02\x03\x04")
    back = torch.empty(MiB)
    engine.read(back, target).wait()
    assert not torch.equal(back, torch.zeros(MiB))
    assert engine.checksummed_bytes == 0
    verifying = make_engine("aio")
    verifying.write(torch.zeros(MiB), target).wait()
    assert verifying.checksummed_bytes == 4 * MiB
