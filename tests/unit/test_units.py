"""sshfiles.units: sizes as people write them, and as we print them."""

from __future__ import annotations

import pytest

from sshfiles.units import UNLIMITED_WORDS, format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("0", 0), ("1", 1), ("512b", 512), ("512B", 512),
    ("1k", 1000), ("1KB", 1000), ("1kib", 1024), ("1KiB", 1024),
    ("500MiB", 500 * 2**20), ("2GiB", 2 * 2**30), ("10GB", 10 * 10**9), ("1.5TiB", 3 * 2**39),
    ("1.5 KiB", 1536), ("  7 mb  ", 7 * 10**6), ("2.5kb", 2500), ("0.5KiB", 512), ("1.000KiB", 1024),
    ("4.35GB", 4_350_000_000), ("2t", 2 * 10**12), ("3 TB", 3 * 10**12),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("word", [*UNLIMITED_WORDS, "Unlimited", " NONE ", "Off"])
def test_parse_unlimited(word: str) -> None:
    assert parse_size(word) is None


@pytest.mark.parametrize("text", ["", " ", "-1", "+1", "1e3", "1,5MiB", "1.5.2", ".5KiB", "5.", "KiB", "12 34",
                                  "1 PiB", "1 kibibyte", "inf", "nan", "unlimitedMiB", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size") as exc:
        parse_size(text)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("text", ["0.5b", "1.5", "0.1KiB", "1.0000001KiB"])
def test_parse_size_refuses_fractions_of_a_byte(text: str) -> None:
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size(text)


@pytest.mark.xfail(strict=True, reason="parse_size goes through float: integers above 2**53 lose precision "
                                       "(reported; behaviour left unchanged in this branch)")
def test_parse_size_is_exact_for_large_integers() -> None:
    assert parse_size(str(2**53 + 1)) == 2**53 + 1


@pytest.mark.parametrize("n,expected", [
    (None, "unlimited"), (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (2**20 - 1, "1024.0 KiB"), (2**20, "1.0 MiB"), (5 * 2**30, "5.0 GiB"), (2**40, "1.0 TiB"),
    (2**50, "1024.0 TiB"), (-2048, "-2.0 KiB"), (-5, "-5 B"),
])
def test_format_size(n: int | None, expected: str) -> None:
    assert format_size(n) == expected
