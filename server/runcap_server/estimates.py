"""LLM-call estimates: what Reserve holds for a call, and what its usage cost.

The estimate is the worst case the call can bill: its input tokens at the input
price plus its effective maximum output at the output price, where the
effective maximum is the smallest of the request's `max_output_tokens`, the
server's cap (RUNCAP_MAX_OUTPUT_TOKENS) and the model's own output limit. A
tiered model is priced at the rates of the tier its input tokens fall in (the
base rates up to the first tier's threshold, see `ModelPrice.rates_for`). A
model the price table does not know cannot be estimated: the Reserve is
blocked (fail closed). The rates used, a tier's if one applied, are stored with
the reservation, so a Commit by usage is priced at them, with the same table
version, even after a reload.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from runcap_server.errors import FieldViolation, InvalidArgument
from runcap_server.prices import ModelPrice, Rates, TokenUsage, cost_micros, estimate_micros


@dataclass(frozen=True, slots=True)
class LlmCall:
    provider: str
    model: str
    input_tokens: int
    # None: the request gave none.
    max_output_tokens: int | None
    # What a model must offer to stand in for this call (alternatives).
    needs_tools: bool = False
    needs_json_schema: bool = False
    min_context_tokens: int | None = None
    modalities: frozenset[str] = frozenset()
    # The "provider/model" names the caller can use instead; empty: any.
    candidates: frozenset[str] = frozenset()

    def on(self, provider: str, model: str) -> LlmCall:
        """The same call on another model."""
        return dataclasses.replace(self, provider=provider, model=model)


@dataclass(frozen=True, slots=True)
class Estimate:
    call: LlmCall
    # 0 when the model is unknown.
    effective_max_output_tokens: int
    amount_micros: int
    price_table_version: str
    # How it was priced, stored with the reservation (the "#" never appears in
    # versions, rates or model names): "<version>#<rates>#<effective max
    # output>#<provider>#<model>#<input tokens>", where <rates> are those of
    # the tier the input tokens selected; "" when the model is unknown.
    pricing: str

    @property
    def known(self) -> bool:
        return bool(self.pricing)

    @property
    def fingerprint(self) -> str:
        """The request's own arguments, compared when the reservation is retried."""
        call = self.call
        max_output = "" if call.max_output_tokens is None else str(call.max_output_tokens)
        return f"llm:{call.provider}:{call.model}:{call.input_tokens}:{max_output}"


def estimate(
    price: ModelPrice | None,
    version: str,
    call: LlmCall,
    *,
    default_max_output: int,
    max_output_cap: int,
) -> Estimate:
    """Price `call` at `price` (None: unknown), from the prices named `version`,
    at the rates of the tier that `call.input_tokens` selects.

    Policy values of 0 mean "none".
    """
    requested = call.max_output_tokens or default_max_output
    if not requested:
        raise InvalidArgument(
            [
                FieldViolation(
                    "llm_call.max_output_tokens",
                    "is required: the server holds the call's worst case, and this "
                    "server has no default (RUNCAP_DEFAULT_MAX_OUTPUT_TOKENS)",
                )
            ]
        )
    if price is None:
        return Estimate(call, 0, 0, version, "")
    limits = [requested, max_output_cap or requested, price.max_output_tokens or requested]
    effective = min(limits)
    rates = price.rates_for(call.input_tokens)
    amount = estimate_micros(rates, call.input_tokens, effective)
    parts = (version, rates.encode(), effective, call.provider, call.model, call.input_tokens)
    return Estimate(call, effective, amount, version, "#".join(str(p) for p in parts))


@dataclass(frozen=True, slots=True)
class Pricing:
    """A stored reservation's pricing, read back."""

    version: str
    rates: Rates
    # None for reservations priced before these were stored.
    effective_max_output_tokens: int | None = None
    provider: str = ""
    model: str = ""
    input_tokens: int = 0
    # A CALIBRATED run's call (ledger.core._calibrated appends "#<output>#<n>"):
    # the output tokens held (None: the worst case) and the samples seen.
    calibrated_output_tokens: int | None = None
    calibration_samples: int | None = None

    @classmethod
    def decode(cls, pricing: str) -> Pricing:
        version, rates, *call = pricing.split("#")
        if not call:
            return cls(version, Rates.decode(rates))
        effective, provider, model, input_tokens, *basis = call
        output, samples = basis if basis else ("", None)
        return cls(
            version,
            Rates.decode(rates),
            int(effective),
            provider,
            model,
            int(input_tokens),
            int(output) if output else None,
            None if samples is None else int(samples),
        )


def actual_micros(pricing: str, usage: TokenUsage) -> int:
    """What `usage` cost at the rates a reservation was priced with."""
    return cost_micros(Pricing.decode(pricing).rates, usage)
