"""Sizes in configs and on the command line."""

import pytest

from deepspeed_fuyou.config.sizes import format_size, parse_size
from deepspeed_fuyou.errors import FuyouConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("1MiB", 1 << 20),
        ("1 GiB", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("512MB", 512 * 10**6),
        ("8gib", 8 << 30),
        ("2TiB", 2 << 40),
        ("10B", 10),
        ("4KB", 4000),
        ("4KiB", 4096),
    ],
)
def test_sizes_parse_with_binary_and_decimal_units(text: object, expected: int) -> None:
    assert parse_size(text, "fuyou.x") == expected


@pytest.mark.parametrize("bad", ["", "lots", "1XB", "-1", -5, 1.5, True, None, "1 Gib 2"])
def test_malformed_sizes_name_the_field(bad: object) -> None:
    with pytest.raises(FuyouConfigError) as err:
        parse_size(bad, "fuyou.pinned_memory")
    assert err.value.field == "fuyou.pinned_memory"


def test_format_size_is_readable() -> None:
    assert format_size(512) == "512 B"
    assert format_size(3 << 29) == "1.50 GiB"
    assert format_size(5 << 40) == "5.00 TiB"
