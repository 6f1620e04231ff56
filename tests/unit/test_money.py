"""USD <-> micro-USD conversion for the command line: exact, never float."""

from __future__ import annotations

import pytest

from runcap_server.money import MAX_MICROS, format_usd, parse_micros, parse_usd


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.00"),
        (1, "$0.000001"),
        (123, "$0.000123"),
        (10_000, "$0.01"),
        (1_200_000, "$1.20"),
        (1_234_500, "$1.2345"),
        (5_000_000, "$5.00"),
        (1_000_000_001, "$1000.000001"),
        (-3_000_000, "-$3.00"),
        (-450, "-$0.00045"),
        (MAX_MICROS, "$9007199254.740991"),
    ],
)
def test_format_usd(micros: int, text: str) -> None:
    assert format_usd(micros) == text


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("5", 5_000_000),
        ("5.00", 5_000_000),
        ("$5", 5_000_000),
        (" $1.20 ", 1_200_000),
        ("0.000123", 123),
        (".5", 500_000),
        ("7.", 7_000_000),
        ("+2", 2_000_000),
        ("1_000.25", 1_000_250_000),
        # Trailing zeros beyond 6 places do not change the value.
        ("1.2000000", 1_200_000),
        ("0", 0),
        ("-0", 0),
        ("9007199254.740991", MAX_MICROS),
        # Many significant digits stay exact (no float, no context rounding).
        ("1234567890.123456", 1_234_567_890_123_456),
    ],
)
def test_parse_usd(text: str, micros: int) -> None:
    assert parse_usd(text) == micros


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.2345678", "more than 6 decimal places"),
        ("0.0000001", "more than 6 decimal places"),
        ("1.0000000000000000000000000000001", "more than 6 decimal places"),
        ("-1", "must not be negative"),
        ("-$0.50", "must not be negative"),
        ("$-0.50", "must not be negative"),
        ("", "expected USD"),
        ("abc", "expected USD"),
        ("1e3", "expected USD"),
        ("1,000", "expected USD"),
        ("NaN", "expected USD"),
        ("Infinity", "expected USD"),
        ("$", "expected USD"),
        ("--1", "expected USD"),
        ("+$-1", "expected USD"),
        ("9007199254.740992", "at most"),
    ],
)
def test_parse_usd_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_usd(text)


def test_parse_and_format_round_trip() -> None:
    for micros in (0, 1, 99, 100_000, 1_200_000, 123_456_789, MAX_MICROS):
        assert parse_usd(format_usd(micros)) == micros


@pytest.mark.parametrize(
    ("text", "micros"), [("40000", 40_000), ("1_500_000", 1_500_000), ("0", 0), ("+7", 7)]
)
def test_parse_micros(text: str, micros: int) -> None:
    assert parse_micros(text) == micros


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-5", "must not be negative"),
        ("1.5", "whole number"),
        ("$5", "whole number"),
        ("", "whole number"),
        (str(MAX_MICROS + 1), "at most"),
    ],
)
def test_parse_micros_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_micros(text)
