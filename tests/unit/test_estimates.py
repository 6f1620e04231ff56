"""LLM-call estimates (estimates.estimate) and Commit by usage (actual_micros).

Every amount is worked out by hand from the rates written here (micro-USD per
1,000,000 tokens), not by calling the formula under test. LONG is tiered like
Gemini 2.5 Pro: its rates go up for a prompt of more than 200,000 input tokens
(cached ones included), for every token of the call.
"""

from __future__ import annotations

import pytest

from runcap_server import alternatives
from runcap_server.errors import InvalidArgument
from runcap_server.estimates import LlmCall, Pricing, actual_micros, estimate
from runcap_server.prices import ModelPrice, Rates, Tier, TokenUsage

BASE = Rates(1_250_000, 10_000_000, 125_000, 1_250_000, 10_000_000)
ABOVE_200K = Rates(2_500_000, 15_000_000, 250_000, 2_500_000, 15_000_000)
LONG = ModelPrice(
    provider="acme",
    model="long",
    rates=BASE,
    context_window=1_048_576,
    max_output_tokens=65_536,
    tools=True,
    json_schema=True,
    modalities=frozenset({"text"}),
    tiers=(Tier(200_000, ABOVE_200K),),
)
# Untiered, as every tenant price is: $2 in, $12 out whatever the prompt.
FLAT = ModelPrice(
    provider="acme",
    model="flat",
    rates=Rates(2_000_000, 12_000_000, 200_000, 2_000_000, 12_000_000),
    context_window=1_048_576,
    max_output_tokens=None,
    tools=True,
    json_schema=True,
    modalities=frozenset({"text"}),
)


# No server default for max_output_tokens and no server cap.
NO_POLICY = {"default_max_output": 0, "max_output_cap": 0}


def call(input_tokens: int, max_output_tokens: int | None = 8_192, model: str = "long") -> LlmCall:
    return LlmCall("acme", model, input_tokens, max_output_tokens)


@pytest.mark.parametrize(
    ("input_tokens", "micros", "rates"),
    [
        # Below the threshold, base rates: 199,999 x 1.25 + 8,192 x 10
        #   = 249,998.75 + 81,920 = 331,918.75 -> 331,919
        (199_999, 331_919, "1250000,10000000,125000,1250000,10000000"),
        # At it, still base (the tier is for *more than* 200,000): 250,000 + 81,920
        (200_000, 331_920, "1250000,10000000,125000,1250000,10000000"),
        # Above it, the tier's rates for input and output alike:
        # 200,001 x 2.5 + 8,192 x 15 = 500,002.5 + 122,880 = 622,882.5 -> 622,883
        (200_001, 622_883, "2500000,15000000,250000,2500000,15000000"),
        # Far above: 1,000,000 x 2.5 + 8,192 x 15 = 2,500,000 + 122,880
        (1_000_000, 2_622_880, "2500000,15000000,250000,2500000,15000000"),
    ],
)
def test_a_tiered_model_is_estimated_at_the_tier_of_its_input(
    input_tokens: int, micros: int, rates: str
) -> None:
    result = estimate(LONG, "v1", call(input_tokens), **NO_POLICY)
    assert result.amount_micros == micros
    assert result.effective_max_output_tokens == 8_192
    assert result.pricing == f"v1#{rates}#8192#acme#long#{input_tokens}"
    stored = Pricing.decode(result.pricing)
    assert stored.rates == Rates.decode(rates)
    assert (stored.version, stored.input_tokens, stored.effective_max_output_tokens) == (
        "v1",
        input_tokens,
        8_192,
    )


def test_commit_by_usage_is_priced_at_the_stored_tiers_rates() -> None:
    below = estimate(LONG, "v1", call(199_999), **NO_POLICY)
    above = estimate(LONG, "v1", call(200_001), **NO_POLICY)
    # At base rates (the reservation's 199,999 tokens, 50,000 of them cache reads
    # and 1,000 cache writes): 148,999 x 1.25 + 2,000 x 10 + 50,000 x 0.125
    # + 1,000 x 1.25 + 1,000 x 10 (reasoning)
    #   = 186,248.75 + 20,000 + 6,250 + 1,250 + 10,000 = 223,748.75 -> 223,749
    usage = TokenUsage(148_999, 2_000, 50_000, 1_000, 1_000)
    assert actual_micros(below.pricing, usage) == 223_749
    # At the tier's (200,001 tokens): 149,001 x 2.5 + 2,000 x 15 + 50,000 x 0.25
    # + 1,000 x 2.5 + 1,000 x 15
    #   = 372,502.5 + 30,000 + 12,500 + 2,500 + 15,000 = 432,502.5 -> 432,503
    usage = TokenUsage(149_001, 2_000, 50_000, 1_000, 1_000)
    assert actual_micros(above.pricing, usage) == 432_503
    # The stored rates are used as they are: the model's price is not read again.
    assert actual_micros(above.pricing, TokenUsage(input_tokens=1)) == 3  # 2.5 -> 3


def test_an_untiered_price_is_the_same_for_any_prompt() -> None:
    # 1,000,000 x 2 + 8,192 x 12 = 2,000,000 + 98,304 = 2,098,304
    result = estimate(FLAT, "tenant-3", call(1_000_000, model="flat"), **NO_POLICY)
    assert result.amount_micros == 2_098_304
    assert result.pricing == (
        "tenant-3#2000000,12000000,200000,2000000,12000000#8192#acme#flat#1000000"
    )


def test_the_effective_max_output_is_the_smallest_limit() -> None:
    # The server's cap (4,000) is below the request's 8,192 and the model's
    # 65,536: 200,001 x 2.5 + 4,000 x 15 = 500,002.5 + 60,000 -> 560,003
    result = estimate(LONG, "v1", call(200_001), default_max_output=0, max_output_cap=4_000)
    assert (result.effective_max_output_tokens, result.amount_micros) == (4_000, 560_003)
    # No max_output_tokens in the request: the server's default (1,000), at
    # base rates: 10 x 1.25 + 1,000 x 10 = 12.5 + 10,000 -> 10,013
    result = estimate(LONG, "v1", call(10, None), default_max_output=1_000, max_output_cap=0)
    assert (result.effective_max_output_tokens, result.amount_micros) == (1_000, 10_013)
    # The model's own limit: 100,000 asked, 65,536 possible.
    result = estimate(LONG, "v1", call(0, 100_000), **NO_POLICY)
    assert (result.effective_max_output_tokens, result.amount_micros) == (65_536, 655_360)


def test_an_unknown_model_and_a_missing_max_output() -> None:
    unknown = estimate(None, "v1", call(300_000), **NO_POLICY)
    assert (unknown.amount_micros, unknown.pricing, unknown.known) == (0, "", False)
    with pytest.raises(InvalidArgument, match=r"llm_call\.max_output_tokens"):
        estimate(LONG, "v1", call(1, None), **NO_POLICY)


def test_alternatives_are_ranked_at_the_tier_of_the_prompt() -> None:
    models = [(LONG, "v1"), (FLAT, "tenant-1")]

    def ranked(input_tokens: int) -> list[tuple[str, int]]:
        asked = LlmCall("acme", "other", input_tokens, 8_192)
        found = alternatives.find(asked, models, 10**9, allowed=frozenset(), **NO_POLICY)
        return [(a.price.model, a.estimate.amount_micros) for a in found]

    # 100,000 tokens: LONG at base (125,000 + 81,920 = 206,920) is cheaper than
    # FLAT (200,000 + 98,304 = 298,304).
    assert ranked(100_000) == [("long", 206_920), ("flat", 298_304)]
    # 300,000 tokens: LONG's tier (750,000 + 122,880 = 872,880) costs more than
    # FLAT (600,000 + 98,304 = 698,304).
    assert ranked(300_000) == [("flat", 698_304), ("long", 872_880)]
