"""The price table and the pricing math: exact integer micro-USD, never float.

The expected amounts below are worked out by hand from the rates written in
this file (micro-USD per 1,000,000 tokens), not by calling the formula under
test. `test_committed_rates` pins those rates to the committed table: after
`make prices`, update them if a provider changed a price.

Tiered models (higher rates above N input tokens) carry `tiers`: a tier
applies to a prompt of more than `above_input_tokens` input tokens, as in
genai-prices. `test_committed_tiers_match_genai_prices` checks the committed
table against genai-prices itself when it is installed (`make prices`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import re
from datetime import UTC, date, datetime, time
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import pytest

from runcap_server import prices
from runcap_server.prices import (
    ModelPrice,
    PriceBook,
    PriceTable,
    PriceTableError,
    Rates,
    Tier,
    TokenUsage,
    cost_micros,
    estimate_micros,
)

PACKAGED = Path(prices.__file__).with_name("price_table.json")

# Rates as in the committed table: input, output, cache read, cache write, reasoning.
GPT_4O = Rates(2_500_000, 10_000_000, 1_250_000, 2_500_000, 10_000_000)
GPT_4O_MINI = Rates(150_000, 600_000, 75_000, 150_000, 600_000)
O3 = Rates(2_000_000, 8_000_000, 500_000, 2_000_000, 8_000_000)
CLAUDE_SONNET_4_5 = Rates(3_000_000, 15_000_000, 300_000, 3_750_000, 15_000_000)
CLAUDE_HAIKU_4_5 = Rates(1_000_000, 5_000_000, 100_000, 1_250_000, 5_000_000)
CLAUDE_OPUS_4_1 = Rates(15_000_000, 75_000_000, 1_500_000, 18_750_000, 75_000_000)
GEMINI_2_5_PRO = Rates(1_250_000, 10_000_000, 125_000, 1_250_000, 10_000_000)
GEMINI_2_5_FLASH = Rates(300_000, 2_500_000, 30_000, 300_000, 2_500_000)
LLAMA_3_3_70B = Rates(590_000, 790_000, 590_000, 590_000, 790_000)
# Their tiers, as in the committed table: the rates of a prompt of more than N input tokens.
GEMINI_2_5_PRO_ABOVE_200K = Rates(2_500_000, 15_000_000, 250_000, 2_500_000, 15_000_000)
CLAUDE_SONNET_4_5_ABOVE_200K = Rates(6_000_000, 22_500_000, 600_000, 7_500_000, 22_500_000)
QWEN3_CODER_FLASH = Rates(195_000, 975_000, 39_000, 243_750, 975_000)
QWEN3_CODER_FLASH_ABOVE_32K = Rates(325_000, 1_625_000, 65_000, 406_250, 1_625_000)
QWEN3_CODER_FLASH_ABOVE_128K = Rates(520_000, 2_600_000, 104_000, 650_000, 2_600_000)

COMMITTED = [
    ("openai", "gpt-4o", GPT_4O),
    ("openai", "gpt-4o-mini", GPT_4O_MINI),
    ("openai", "o3", O3),
    ("anthropic", "claude-sonnet-4-5", CLAUDE_SONNET_4_5),
    ("anthropic", "claude-haiku-4-5", CLAUDE_HAIKU_4_5),
    ("anthropic", "claude-opus-4-1", CLAUDE_OPUS_4_1),
    ("google", "gemini-2.5-pro", GEMINI_2_5_PRO),
    ("google", "gemini-2.5-flash", GEMINI_2_5_FLASH),
    ("groq", "llama-3.3-70b-versatile", LLAMA_3_3_70B),
]


@pytest.fixture(scope="module")
def packaged() -> PriceTable:
    return PriceTable.packaged()


@pytest.mark.parametrize(("provider", "model", "rates"), COMMITTED)
def test_committed_rates(packaged: PriceTable, provider: str, model: str, rates: Rates) -> None:
    price = packaged.lookup(provider, model)
    assert price is not None, f"{provider}/{model} is not in the table"
    assert price.rates == rates


COMMITTED_TIERS = [
    ("google", "gemini-2.5-pro", (Tier(200_000, GEMINI_2_5_PRO_ABOVE_200K),)),
    ("anthropic", "claude-sonnet-4-5", (Tier(200_000, CLAUDE_SONNET_4_5_ABOVE_200K),)),
    (
        "openrouter",
        "qwen/qwen3-coder-flash",
        (Tier(32_000, QWEN3_CODER_FLASH_ABOVE_32K), Tier(128_000, QWEN3_CODER_FLASH_ABOVE_128K)),
    ),
]


@pytest.mark.parametrize(("provider", "model", "tiers"), COMMITTED_TIERS)
def test_committed_tiers(
    packaged: PriceTable, provider: str, model: str, tiers: tuple[Tier, ...]
) -> None:
    price = packaged.lookup(provider, model)
    assert price is not None, f"{provider}/{model} is not in the table"
    assert price.tiers == tiers


def test_an_untiered_model_has_no_tiers(packaged: PriceTable) -> None:
    price = packaged.lookup("openai", "gpt-4o")
    assert price is not None
    assert price.tiers == ()
    assert price.rates_for(10**9) == GPT_4O


@pytest.mark.parametrize(
    ("input_tokens", "rates"),
    [
        (0, QWEN3_CODER_FLASH),
        (1, QWEN3_CODER_FLASH),
        (31_999, QWEN3_CODER_FLASH),
        # The threshold itself is not above it: still the base rates (genai-prices: `>`).
        (32_000, QWEN3_CODER_FLASH),
        (32_001, QWEN3_CODER_FLASH_ABOVE_32K),
        (128_000, QWEN3_CODER_FLASH_ABOVE_32K),
        (128_001, QWEN3_CODER_FLASH_ABOVE_128K),
        (2**62, QWEN3_CODER_FLASH_ABOVE_128K),
    ],
)
def test_rates_for_picks_the_last_tier_the_prompt_is_above(
    packaged: PriceTable, input_tokens: int, rates: Rates
) -> None:
    price = packaged.lookup("openrouter", "qwen/qwen3-coder-flash")
    assert price is not None
    assert price.rates == QWEN3_CODER_FLASH
    assert price.rates_for(input_tokens) == rates


def test_rates_for_refuses_a_bad_token_count(packaged: PriceTable) -> None:
    price = packaged.lookup("google", "gemini-2.5-pro")
    assert price is not None
    for bad in (-1, 1.5, True, "200001"):
        with pytest.raises(ValueError, match="input_tokens"):
            price.rates_for(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("input_tokens", "usage", "micros"),
    [
        # gemini-2.5-pro, a prompt of 199,999 tokens (base rates):
        # 149,999 x 1.25 + 50,000 x 0.125 + 2,000 x 10 + 1,000 x 10 (reasoning)
        #   = 187,498.75 + 6,250 + 20,000 + 10,000 = 223,748.75 -> 223,749
        (199_999, TokenUsage(149_999, 2_000, 50_000, 0, 1_000), 223_749),
        # 200,000 tokens: not above the threshold, still base:
        # 150,000 x 1.25 + 6,250 + 20,000 + 10,000 = 187,500 + 36,250 = 223,750
        (200_000, TokenUsage(150_000, 2_000, 50_000, 0, 1_000), 223_750),
        # 200,001 tokens: the tier, for every token, output included:
        # 150,001 x 2.5 + 50,000 x 0.25 + 2,000 x 15 + 1,000 x 15
        #   = 375,002.5 + 12,500 + 30,000 + 15,000 = 432,502.5 -> 432,503
        (200_001, TokenUsage(150_001, 2_000, 50_000, 0, 1_000), 432_503),
    ],
)
def test_cost_of_a_tiered_model_below_at_and_above_its_threshold(
    packaged: PriceTable, input_tokens: int, usage: TokenUsage, micros: int
) -> None:
    price = packaged.lookup("google", "gemini-2.5-pro")
    assert price is not None
    assert cost_micros(price.rates_for(input_tokens), usage) == micros


@pytest.mark.parametrize(
    ("rates", "usage", "micros"),
    [
        # gpt-4o: 1,234 x 2.5 + 567 x 10 + 8,901 x 1.25
        #   = 3,085 + 5,670 + 11,126.25 = 19,881.25 -> 19,882
        (
            GPT_4O,
            TokenUsage(input_tokens=1_234, output_tokens=567, cache_read_tokens=8_901),
            19_882,
        ),
        # o3: 10,001 x 2 + 1,501 x 8 + 40,003 x 0.5 + 6,007 x 8 (reasoning)
        #   = 20,002 + 12,008 + 20,001.5 + 48,056 = 100,067.5 -> 100,068
        (
            O3,
            TokenUsage(
                input_tokens=10_001,
                output_tokens=1_501,
                cache_read_tokens=40_003,
                reasoning_tokens=6_007,
            ),
            100_068,
        ),
        # claude-sonnet-4-5: 2,000 x 3 + 800 x 15 + 150,000 x 0.3 + 12,345 x 3.75 + 3,210 x 15
        #   = 6,000 + 12,000 + 45,000 + 46,293.75 + 48,150 = 157,443.75 -> 157,444
        (
            CLAUDE_SONNET_4_5,
            TokenUsage(2_000, 800, 150_000, 12_345, 3_210),
            157_444,
        ),
        # claude-haiku-4-5: 7 x 1 + 3 x 5 + 11 x 1.25 = 7 + 15 + 13.75 = 35.75 -> 36
        (CLAUDE_HAIKU_4_5, TokenUsage(input_tokens=7, output_tokens=3, cache_write_tokens=11), 36),
        # claude-opus-4-1: 1 x 75 + 1,000 x 18.75 = 75 + 18,750 = 18,825
        (CLAUDE_OPUS_4_1, TokenUsage(output_tokens=1, cache_write_tokens=1_000), 18_825),
        # gemini-2.5-pro: 100,000 x 1.25 + 2,000 x 10 + 50,000 x 0.125 + 9,999 x 10
        #   = 125,000 + 20,000 + 6,250 + 99,990 = 251,240 (exact)
        (GEMINI_2_5_PRO, TokenUsage(100_000, 2_000, 50_000, 0, 9_999), 251_240),
        # gemini-2.5-flash: 333 x 0.3 + 77 x 2.5 + 1,000 x 0.03 + 4,321 x 2.5
        #   = 99.9 + 192.5 + 30 + 10,802.5 = 11,124.9 -> 11,125
        (GEMINI_2_5_FLASH, TokenUsage(333, 77, 1_000, 0, 4_321), 11_125),
        # llama-3.3-70b on groq: 1M x 0.59 + 1M x 0.79 = 590,000 + 790,000 = 1,380,000 ($1.38)
        (LLAMA_3_3_70B, TokenUsage(input_tokens=1_000_000, output_tokens=1_000_000), 1_380_000),
        # gpt-4o-mini: 1 input token = 0.15 micro -> 1
        (GPT_4O_MINI, TokenUsage(input_tokens=1), 1),
        (GPT_4O, TokenUsage(), 0),
    ],
)
def test_cost_micros(rates: Rates, usage: TokenUsage, micros: int) -> None:
    assert cost_micros(rates, usage) == micros


@pytest.mark.parametrize(
    ("rates", "input_tokens", "max_output_tokens", "micros"),
    [
        # 1,234 x 2.5 + 4,096 x 10 = 3,085 + 40,960 = 44,045
        (GPT_4O, 1_234, 4_096, 44_045),
        # 10,001 x 3 + 1,001 x 15 = 30,003 + 15,015 = 45,018
        (CLAUDE_SONNET_4_5, 10_001, 1_001, 45_018),
        # 333 x 0.3 + 77 x 2.5 = 99.9 + 192.5 = 292.4 -> 293
        (GEMINI_2_5_FLASH, 333, 77, 293),
        # 200,000 x 1.25 + 65,536 x 10 = 250,000 + 655,360 = 905,360
        (GEMINI_2_5_PRO, 200_000, 65_536, 905_360),
        # 1 x 0.15 -> 1; nothing -> 0
        (GPT_4O_MINI, 1, 0, 1),
        (GPT_4O_MINI, 0, 0, 0),
    ],
)
def test_estimate_micros(
    rates: Rates, input_tokens: int, max_output_tokens: int, micros: int
) -> None:
    assert estimate_micros(rates, input_tokens, max_output_tokens) == micros


def test_one_token_of_a_cheap_model_costs_one_micro_never_zero() -> None:
    cheapest = Rates(1, 1, 1, 1, 1)  # $0.000001 per million tokens
    for usage in (
        TokenUsage(input_tokens=1),
        TokenUsage(output_tokens=1),
        TokenUsage(cache_read_tokens=1),
        TokenUsage(cache_write_tokens=1),
        TokenUsage(reasoning_tokens=1),
    ):
        assert cost_micros(cheapest, usage) == 1
    assert estimate_micros(cheapest, 1, 0) == 1
    assert estimate_micros(cheapest, 0, 1) == 1
    # One ceiling over the exact sum, not one per class: 5 x 0.2 = 1.0 -> 1, not 5.
    fifth = Rates(200_000, 200_000, 200_000, 200_000, 200_000)
    assert cost_micros(fifth, TokenUsage(1, 1, 1, 1, 1)) == 1
    # Just past a whole micro rounds up: 1,000,001 tokens at 1 micro per million.
    assert cost_micros(Rates(1, 0, 0, 0, 0), TokenUsage(input_tokens=1_000_001)) == 2


def test_float_arithmetic_would_be_off_by_one_integer_math_is_not() -> None:
    # gpt-4o-mini: 1 input, 9 output, 6 cache-read tokens:
    # 0.15 + 5.4 + 0.45 = 6 micro-USD exactly.
    usage = TokenUsage(input_tokens=1, output_tokens=9, cache_read_tokens=6)
    with_floats = math.ceil(1 * 150_000 / 1e6 + 9 * 600_000 / 1e6 + 6 * 75_000 / 1e6)
    assert with_floats == 7  # 6.000000000000001 rounded up
    assert cost_micros(GPT_4O_MINI, usage) == 6

    # gpt-4o, 6 input tokens at $2.50 per million in USD floats: 15 micro-USD exactly.
    with_usd_floats = math.ceil(6 * (2.5 / 1e6) * 1e6)
    assert with_usd_floats == 16
    assert cost_micros(GPT_4O, TokenUsage(input_tokens=6)) == 15
    assert estimate_micros(GPT_4O, 6, 0) == 15

    # Past 2**53 a float cannot even hold the count; integers stay exact.
    huge = 2**53 + 1
    assert float(huge) == float(huge - 1)
    assert cost_micros(Rates(1_000_000, 0, 0, 0, 0), TokenUsage(input_tokens=huge)) == huge
    assert estimate_micros(Rates(0, 3_000_000, 0, 0, 0), 0, huge) == 3 * huge


def test_floats_are_refused_not_rounded() -> None:
    with pytest.raises(ValueError, match="rate input"):
        Rates(2.5, 1, 1, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate output"):
        Rates(1, -1, 1, 1, 1)
    with pytest.raises(ValueError, match="input_tokens"):
        TokenUsage(input_tokens=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reasoning_tokens"):
        TokenUsage(reasoning_tokens=-1)
    with pytest.raises(ValueError, match="max_output_tokens"):
        estimate_micros(GPT_4O, 1, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_tokens"):
        estimate_micros(GPT_4O, True, 1)


def test_rates_encode_and_decode() -> None:
    assert CLAUDE_SONNET_4_5.encode() == "3000000,15000000,300000,3750000,15000000"
    assert Rates.decode("3000000,15000000,300000,3750000,15000000") == CLAUDE_SONNET_4_5
    assert Rates.decode("0,0,0,0,0") == Rates(0, 0, 0, 0, 0)
    for _, _, rates in COMMITTED:
        assert Rates.decode(rates.encode()) == rates
    for bad in (
        "",
        "1,2,3,4",
        "1,2,3,4,5,6",
        "1,2,3,4,-5",
        "1,2,3,4,2.5",
        "1,2, 3,4,5",
        "a,b,c,d,e",
    ):
        with pytest.raises(ValueError, match="invalid rates"):
            Rates.decode(bad)


# --- loading and validation ------------------------------------------------------------


def entry(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-4o",
        "input": 2_500_000,
        "output": 10_000_000,
        "cache_read": 1_250_000,
        "cache_write": 2_500_000,
        "reasoning": 10_000_000,
        "context_window": 128_000,
        "max_output_tokens": 16_384,
        "tools": True,
        "json_schema": True,
        "modalities": ["image", "text"],
    }
    base.update(changes)
    return base


def document(*models: object, version: object = "test-1") -> dict[str, Any]:
    return {"version": version, "sources": {"test": True}, "models": list(models)}


def write(path: Path, content: dict[str, Any] | str) -> Path:
    text = content if isinstance(content, str) else json.dumps(content)
    path.write_text(text, encoding="utf-8")
    return path


def test_load_a_valid_file(tmp_path: Path) -> None:
    cheap = entry(model="gpt-4o-mini", context_window=None, max_output_tokens=None, tools=False)
    table = PriceTable.load(write(tmp_path / "t.json", document(entry(), cheap)))
    assert table.version == "test-1"
    assert len(table) == 2
    assert [m.model for m in table.models()] == ["gpt-4o", "gpt-4o-mini"]
    assert table.lookup("openai", "gpt-4o") == ModelPrice(
        provider="openai",
        model="gpt-4o",
        rates=GPT_4O,
        context_window=128_000,
        max_output_tokens=16_384,
        tools=True,
        json_schema=True,
        modalities=frozenset({"image", "text"}),
    )
    mini = table.lookup("openai", "gpt-4o-mini")
    assert mini is not None
    assert (mini.context_window, mini.max_output_tokens, mini.tools) == (None, None, False)


def test_lookup_is_exact(tmp_path: Path) -> None:
    table = PriceTable.load(write(tmp_path / "t.json", document(entry())))
    assert table.lookup("openai", "gpt-4o") is not None
    for provider, model in [
        ("openai", "GPT-4o"),
        ("openai", "gpt-4o-2024-08-06"),
        ("openai", "gpt-4o "),
        ("azure", "gpt-4o"),
        ("OpenAI", "gpt-4o"),
        ("", "gpt-4o"),
    ]:
        assert table.lookup(provider, model) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # A missing field.
        (
            document({k: v for k, v in entry().items() if k != "output"}),
            r"field 'output' is missing",
        ),
        # A negative price.
        (document(entry(cache_read=-1)), r"field 'cache_read' must be an integer .* got -1"),
        # A float price: refused, not rounded.
        (document(entry(input=2.5)), r"field 'input' must be an integer .* got 2\.5 \(a decimal"),
        (document(entry(input=2500000.0)), r"field 'input' must be an integer .* 2500000\.0"),
        (document(entry(input=1e6)), r"field 'input' must be an integer .* got 1000000\.0"),
        (document(entry(output="10000000")), r"field 'output' must be an integer .* '10000000'"),
        (document(entry(reasoning=True)), r"field 'reasoning' must be an integer .* got True"),
        (document(entry(input=2**53)), r"field 'input' must be an integer"),
        (document(entry(context_window=0)), r"field 'context_window' must be a positive"),
        (document(entry(max_output_tokens=1.5)), r"field 'max_output_tokens' must be a positive"),
        (document(entry(tools=1)), r"field 'tools' must be true or false, got 1"),
        (document(entry(json_schema=None)), r"field 'json_schema' must be true or false"),
        (document(entry(modalities="text")), r"field 'modalities' must be a list"),
        (document(entry(modalities=["text", "text"])), r"field 'modalities' must be a list"),
        (document(entry(modalities=[1])), r"field 'modalities' must be a list"),
        (document(entry(model="")), r"models\[0\]: field 'model' must be a non-empty string"),
        (document(entry(provider=None)), r"models\[0\]: field 'provider' must be a non-empty"),
        (document(entry(price=1)), r"unknown field 'price'"),
        (document("gpt-4o"), r"models\[0\]: must be an object"),
    ],
)
def test_load_rejects_a_bad_entry_naming_file_entry_and_field(
    tmp_path: Path, content: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path / "prices.json", content)
    with pytest.raises(PriceTableError, match=expected) as caught:
        PriceTable.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: models[0]")
    named = content["models"][0]
    if isinstance(named, dict) and (named["provider"], named["model"]) == ("openai", "gpt-4o"):
        assert "models[0] (openai/gpt-4o): " in message


def test_load_rejects_a_duplicate_model(tmp_path: Path) -> None:
    path = write(tmp_path / "prices.json", document(entry(), entry(model="o3"), entry(input=1)))
    with pytest.raises(PriceTableError) as caught:
        PriceTable.load(path)
    assert str(caught.value) == (
        f"{path}: models[2] (openai/gpt-4o): duplicate model: models[0] has the same "
        "provider and model"
    )
    # The same model id under another provider is another model.
    table = PriceTable.load(write(path, document(entry(), entry(provider="azure"))))
    assert len(table) == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", r"not a JSON price table"),
        ("{", r"not a JSON price table"),
        ('{"version": "a", "version": "b", "sources": {}, "models": []}', r"duplicate key"),
        (
            '{"version": "v", "sources": {}, "models": [{"input": NaN}]}',
            r"not a JSON price table: NaN is not a number",
        ),
        ("[]", r"top level: must be an object"),
        (json.dumps({"sources": {}, "models": [entry()]}), r"field 'version' is missing"),
        (json.dumps({"version": "v", "models": [entry()]}), r"field 'sources' is missing"),
        (json.dumps({"version": "v", "sources": {}}), r"field 'models' is missing"),
        (json.dumps(document()), r"field 'models': must be a non-empty list"),
        (json.dumps(document(entry(), version="")), r"field 'version': must be 1 to 128"),
        (json.dumps(document(entry(), version="v#1")), r"field 'version': must be 1 to 128"),
        (json.dumps(document(entry(), version="v|1")), r"field 'version': must be 1 to 128"),
        (json.dumps(document(entry(), version=7)), r"field 'version': must be 1 to 128"),
        (json.dumps({**document(entry()), "sources": []}), r"field 'sources': must be an object"),
        (json.dumps({**document(entry()), "extra": 1}), r"top level: unknown field 'extra'"),
    ],
)
def test_load_rejects_a_bad_file(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "prices.json", content)
    with pytest.raises(PriceTableError, match=expected) as caught:
        PriceTable.load(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_load_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(PriceTableError, match=r"absent\.json: cannot read: No such file"):
        PriceTable.load(path)


def test_load_rejects_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b'{"version": "\xff"}')
    with pytest.raises(PriceTableError, match=r"bad\.json: not a JSON price table"):
        PriceTable.load(path)


# --- tiers in a file --------------------------------------------------------------------


def tier(above: object, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "above_input_tokens": above,
        "input": 5_000_000,
        "output": 20_000_000,
        "cache_read": 2_500_000,
        "cache_write": 5_000_000,
        "reasoning": 20_000_000,
    }
    base.update(changes)
    return base


def test_load_a_tiered_model_and_round_trip_it(tmp_path: Path) -> None:
    tiers = [tier(200_000), tier(1_000_000, input=10_000_000)]
    table = PriceTable.load(write(tmp_path / "t.json", document(entry(tiers=tiers))))
    price = table.lookup("openai", "gpt-4o")
    assert price is not None
    assert price.rates == GPT_4O
    above_200k = Rates(5_000_000, 20_000_000, 2_500_000, 5_000_000, 20_000_000)
    above_1m = Rates(10_000_000, 20_000_000, 2_500_000, 5_000_000, 20_000_000)
    assert price.tiers == (Tier(200_000, above_200k), Tier(1_000_000, above_1m))
    assert [price.rates_for(n) for n in (200_000, 200_001, 1_000_000, 1_000_001)] == [
        GPT_4O,
        above_200k,
        above_200k,
        above_1m,
    ]
    assert price.to_entry() == entry(tiers=tiers)
    assert ModelPrice.from_entry(price.to_entry(), "again") == price
    # An untiered model writes no `tiers` field, and reads back the same.
    plain = ModelPrice.from_entry(entry(), "plain")
    assert plain.tiers == ()
    assert plain.to_entry() == entry()
    assert "tiers" not in plain.to_entry()
    # A threshold of 0 is a tier for any prompt of at least one token.
    zero = ModelPrice.from_entry(entry(tiers=[tier(0)]), "zero")
    assert (zero.rates_for(0), zero.rates_for(1)) == (GPT_4O, above_200k)


@pytest.mark.parametrize(
    ("tiers", "expected"),
    [
        ({}, r"field 'tiers' must be a non-empty list .* got \{\}"),
        ([], r"field 'tiers' must be a non-empty list \(omitted when the model is not tiered\)"),
        (None, r"field 'tiers' must be a non-empty list"),
        ([200_000], r"field 'tiers\[0\]' must be an object, got 200000"),
        (
            [{k: v for k, v in tier(1).items() if k != "reasoning"}],
            r"field 'tiers\[0\]\.reasoning' is missing",
        ),
        (
            [{k: v for k, v in tier(1).items() if k != "above_input_tokens"}],
            r"field 'tiers\[0\]\.above_input_tokens' is missing",
        ),
        ([tier(1, start=1)], r"field 'tiers\[0\]' has an unknown field 'start'"),
        ([tier(-1)], r"'tiers\[0\]\.above_input_tokens' must be a non-negative integer, got -1"),
        ([tier(2.5)], r"'tiers\[0\]\.above_input_tokens' must be a non-negative .* decimal"),
        ([tier(True)], r"'tiers\[0\]\.above_input_tokens' must be a non-negative .* True"),
        ([tier("1")], r"'tiers\[0\]\.above_input_tokens' must be a non-negative .* '1'"),
        (
            [tier(200_000), tier(100_000)],
            r"'tiers\[1\]\.above_input_tokens' must be greater than the previous tier's "
            r"\(200000\): tiers ascend, got 100000",
        ),
        ([tier(200_000), tier(200_000)], r"'tiers\[1\]\.above_input_tokens' must be greater"),
        (
            [tier(1), tier(2), tier(2)],
            r"'tiers\[2\]\.above_input_tokens' must be greater than the previous tier's \(2\)",
        ),
        ([tier(1, output=-1)], r"field 'tiers\[0\]\.output' must be an integer .* got -1"),
        ([tier(1, input=2.5)], r"field 'tiers\[0\]\.input' must be an integer .* 2\.5 \(a dec"),
        ([tier(1), tier(2, cache_read=2**53)], r"field 'tiers\[1\]\.cache_read' must be an int"),
        ([tier(1, cache_write=None)], r"field 'tiers\[0\]\.cache_write' must be an integer"),
    ],
)
def test_load_rejects_a_bad_tier_list(tmp_path: Path, tiers: object, expected: str) -> None:
    path = write(tmp_path / "prices.json", document(entry(tiers=tiers)))
    with pytest.raises(PriceTableError, match=expected) as caught:
        PriceTable.load(path)
    assert str(caught.value).startswith(f"{path}: models[0] (openai/gpt-4o): field 'tiers")
    # The same entry given as data (numbers read as the loader reads them).
    given = json.loads(json.dumps(entry(tiers=tiers)), parse_float=Decimal)
    with pytest.raises(PriceTableError, match=expected):
        ModelPrice.from_entry(given, "entry")


def test_tiers_built_in_code_are_checked_too() -> None:
    above = Rates(5_000_000, 20_000_000, 2_500_000, 5_000_000, 20_000_000)
    plain = ModelPrice.from_entry(entry(), "plain")
    fields = {
        "provider": plain.provider,
        "model": plain.model,
        "rates": plain.rates,
        "context_window": plain.context_window,
        "max_output_tokens": plain.max_output_tokens,
        "tools": plain.tools,
        "json_schema": plain.json_schema,
        "modalities": plain.modalities,
    }
    with pytest.raises(ValueError, match="strictly ascending"):
        ModelPrice(**fields, tiers=(Tier(2, above), Tier(1, above)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strictly ascending"):
        ModelPrice(**fields, tiers=(Tier(2, above), Tier(2, above)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tuple of Tier"):
        ModelPrice(**fields, tiers=[Tier(2, above)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="above_input_tokens"):
        Tier(-1, above)
    with pytest.raises(ValueError, match="rates must be Rates"):
        Tier(1, (1, 2, 3, 4, 5))  # type: ignore[arg-type]


# --- the price book and reload ---------------------------------------------------------


def test_reload_keeps_the_old_table_on_a_bad_file_and_swaps_on_a_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "prices.json", document(entry(), version="v1"))
    book = PriceBook(str(path))
    first = book.table
    assert first.version == "v1"
    assert book.path == str(path)

    caplog.set_level(logging.INFO, logger="runcap_server.prices")
    write(path, document(entry(input=-5), version="v2"))
    swapped, message = book.reload()
    assert not swapped
    assert book.table is first
    assert "still using v1" in message
    assert "models[0] (openai/gpt-4o): field 'input'" in message
    assert any(r.levelno == logging.ERROR and "not reloaded" in r.message for r in caplog.records)

    path.unlink()
    swapped, message = book.reload()
    assert not swapped
    assert book.table is first
    assert "cannot read" in message

    write(path, document(entry(input=3_000_000), entry(model="o3"), version="v3"))
    swapped, message = book.reload()
    assert swapped
    assert book.table is not first
    assert book.table.version == "v3"
    assert "version v3, 2 models (was v1)" in message
    price = book.table.lookup("openai", "gpt-4o")
    assert price is not None
    assert price.rates.input == 3_000_000
    # A table taken before the reload is unchanged: a decision uses one version.
    old = first.lookup("openai", "gpt-4o")
    assert old is not None
    assert old.rates.input == 2_500_000
    assert any(r.levelno == logging.INFO and "reloaded" in r.message for r in caplog.records)


def test_a_price_book_does_not_start_on_a_bad_file(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError, match="cannot read"):
        PriceBook(str(tmp_path / "absent.json"))
    with pytest.raises(PriceTableError, match="field 'output' must be an integer"):
        PriceBook(str(write(tmp_path / "t.json", document(entry(output=None)))))


def test_a_price_book_reads_the_packaged_table_by_default(packaged: PriceTable) -> None:
    book = PriceBook(None)
    assert book.path is None
    assert book.table.version == packaged.version
    swapped, message = book.reload()
    assert swapped
    assert "(packaged)" in message


# --- the packaged table ----------------------------------------------------------------


def test_packaged_table_loads_with_a_version(packaged: PriceTable) -> None:
    assert re.fullmatch(
        r"\d{4}-\d{2}-\d{2}\+genai-prices-0\.2\.3\+litellm-[0-9.]+\+[0-9a-f]{12}",
        packaged.version,
    ), packaged.version
    assert len(packaged) > 500
    assert PriceTable.load(PACKAGED).version == packaged.version


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-4.1"),
        ("openai", "gpt-5"),
        ("openai", "o3"),
        ("anthropic", "claude-sonnet-4-5"),
        ("anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-opus-4-1"),
        ("anthropic", "claude-3-5-haiku-latest"),
        ("google", "gemini-2.5-pro"),
        ("google", "gemini-2.5-flash"),
        ("mistral", "mistral-large"),
        ("groq", "llama-3.3-70b-versatile"),
    ],
)
def test_packaged_table_has_well_known_models(
    packaged: PriceTable, provider: str, model: str
) -> None:
    price = packaged.lookup(provider, model)
    assert price is not None, f"{provider}/{model}"
    assert price.rates.input > 0
    assert price.rates.output > 0
    assert "text" in price.modalities


def test_packaged_capabilities(packaged: PriceTable) -> None:
    gpt_4o = packaged.lookup("openai", "gpt-4o")
    assert gpt_4o is not None
    assert (gpt_4o.context_window, gpt_4o.max_output_tokens) == (128_000, 16_384)
    assert gpt_4o.tools
    assert gpt_4o.json_schema
    assert gpt_4o.modalities == {"image", "text"}
    # Gemini 2.5 Flash prices audio input apart: audio is not among its modalities.
    flash = packaged.lookup("google", "gemini-2.5-flash")
    assert flash is not None
    assert "audio" not in flash.modalities
    assert "image" in flash.modalities


def test_packaged_file_is_canonical_and_its_version_names_its_content() -> None:
    raw = json.loads(PACKAGED.read_text(encoding="utf-8"))
    models = raw["models"]
    keys = [(m["provider"], m["model"]) for m in models]
    assert keys == sorted(keys)
    assert all(list(m) == sorted(m) for m in models)
    assert all(list(t) == sorted(t) for m in models for t in m.get("tiers", ()))
    assert list(raw) == sorted(raw)
    # Hand edits show: the version ends with a hash of the models.
    canonical = json.dumps(models, sort_keys=True, separators=(",", ":")).encode()
    assert raw["version"].endswith("+" + hashlib.sha256(canonical).hexdigest()[:12])


def test_load_errors_read_well(tmp_path: Path) -> None:
    path = write(tmp_path / "prices.json", document(entry(), entry(model="o3", input=2.5)))
    with pytest.raises(PriceTableError) as caught:
        PriceTable.load(path)
    assert str(caught.value) == (
        f"{path}: models[1] (openai/o3): field 'input' must be an integer number of "
        "micro-USD per 1,000,000 tokens in [0, 9007199254740991], got 2.5 (a decimal number)"
    )
    missing = {k: v for k, v in entry(model="o3").items() if k != "cache_write"}
    path = write(tmp_path / "prices.json", document(entry(), missing))
    with pytest.raises(PriceTableError) as caught:
        PriceTable.load(path)
    assert str(caught.value) == f"{path}: models[1] (openai/o3): field 'cache_write' is missing"


# --- the committed tiers against genai-prices --------------------------------------------

# genai-prices' price keys that runcap's five rates (and so its tiers) hold.
_RATE_PRICE_KEYS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_5m_mtok",
    "output_reasoning_mtok",
)


def test_committed_tiers_match_genai_prices(packaged: PriceTable) -> None:
    """Every model of the table that genai-prices tiers carries those tiers,
    and is priced as genai-prices prices it just below, at and above each one.

    Needs genai-prices (the `tools` extra, installed by `make prices`)."""
    genai_prices = pytest.importorskip("genai_prices")
    types = pytest.importorskip("genai_prices.types")
    data = pytest.importorskip("genai_prices.data")
    installed = f"genai-prices=={importlib.metadata.version('genai-prices')}"
    raw = json.loads(PACKAGED.read_text(encoding="utf-8"))
    if installed != raw["sources"]["genai-prices"]["package"]:
        pytest.skip(f"{installed} is installed, the table was built with another version")
    as_of = date.fromisoformat(raw["sources"]["prices_as_of"])
    when = datetime.combine(as_of, time(12), tzinfo=UTC)

    tiered = 0
    for provider in data.providers:
        for model in provider.models:
            price = packaged.lookup(provider.id, model.id)
            if price is None:
                continue  # not in the table (not text generation, or not expressible)
            source = model.get_prices(when)
            starts = sorted(
                {
                    tier.start
                    for key in _RATE_PRICE_KEYS
                    if isinstance(value := getattr(source, key, None), types.TieredPrices)
                    for tier in value.tiers
                }
            )
            name = f"{provider.id}/{model.id}"
            assert [t.above_input_tokens for t in price.tiers] == starts, name
            if not starts:
                continue
            tiered += 1
            # A short prompt, and prompts just below, at and just above each threshold.
            prompts = {1_000, *starts, *(s - 1 for s in starts), *(s + 1 for s in starts)}
            for n in sorted(p for p in prompts if p >= 0):
                cached = min(n, 500)
                usage = genai_prices.Usage(
                    input_tokens=n, cache_read_tokens=cached, output_tokens=1_000
                )
                usd = Decimal(source.calc_price(usage)["total_price"])
                expected = int((usd * 1_000_000).to_integral_value(ROUND_CEILING))
                ours = TokenUsage(
                    input_tokens=n - cached, cache_read_tokens=cached, output_tokens=1_000
                )
                assert cost_micros(price.rates_for(n), ours) == expected, (name, n)
    assert tiered == sum(1 for price in packaged.models() if price.tiers) > 0
