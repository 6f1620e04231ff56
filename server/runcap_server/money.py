"""USD <-> micro-USD for people: exact decimal parsing and display.

Money is integer micro-USD everywhere in runcap (1 USD = 1,000,000 micros).
These helpers only convert at the edge (command line, display), exactly: with
integers and `decimal.Decimal`, never binary floats.
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from typing import Final

MICROS_PER_USD: Final = 1_000_000
"""Micro-USD in one USD."""

MAX_MICROS: Final = 2**53 - 1
"""The largest amount the server accepts, in micro-USD."""

_USD = re.compile(r"([+-]?)\$?([+-]?)(\d+(?:_\d+)*(?:\.\d*)?|\.\d+)")
_MICROS = re.compile(r"[+-]?\d+(?:_\d+)*")
_USD_HINT = "expected USD such as 5, 0.25 or $1.50"


def format_usd(micros: int) -> str:
    """Formats micro-USD as dollars with 2 to 6 decimals: ``$1.20``,
    ``$0.000123``, ``-$3.00``, ``$1234.50``."""
    sign = "-" if micros < 0 else ""
    dollars, fraction = divmod(abs(micros), MICROS_PER_USD)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${dollars}.{digits}"


def parse_usd(text: str) -> int:
    """Parses a USD amount (``5``, ``5.00``, ``$0.0004``) into micro-USD.

    The amount must be a plain decimal number, optionally prefixed with
    ``$``, with at most 6 decimal places, not negative and at most
    `MAX_MICROS`. Raises ValueError with a message fit for a user.
    """
    raw = text.strip()
    match = _USD.fullmatch(raw)
    if match is None or (match[1] and match[2]):
        raise ValueError(f"invalid amount {text!r}: {_USD_HINT}")
    number = match[3].replace("_", "")
    with localcontext() as exact:
        # Enough precision that shifting by 6 places never rounds.
        exact.prec = len(number) + 7
        micros = Decimal(number).scaleb(6)
    if micros != micros.to_integral_value():
        raise ValueError(
            f"invalid amount {text!r}: more than 6 decimal places "
            "(the smallest unit is $0.000001, one micro-USD)"
        )
    return _checked(int(micros), "-" in (match[1], match[2]), text)


def parse_micros(text: str) -> int:
    """Parses a whole number of micro-USD (``40000``, ``1_500_000``).
    Raises ValueError with a message fit for a user."""
    raw = text.strip()
    if not _MICROS.fullmatch(raw):
        raise ValueError(f"invalid amount {text!r}: expected a whole number of micro-USD")
    value = int(raw.replace("_", "").lstrip("+-"))
    return _checked(value, raw.startswith("-"), text)


def _checked(micros: int, negative: bool, text: str) -> int:
    if negative and micros != 0:
        raise ValueError(f"invalid amount {text!r}: must not be negative")
    if micros > MAX_MICROS:
        raise ValueError(
            f"invalid amount {text!r}: at most {format_usd(MAX_MICROS)} ({MAX_MICROS} micros)"
        )
    return micros
