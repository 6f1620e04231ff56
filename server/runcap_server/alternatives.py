"""Alternatives: the models that can stand in for an LLM call that did not fit.

A model is an alternative when it has every capability the call needs (tool
calling, JSON-schema output, a context window large enough, the input
modalities), the run's policy lets it be picked (RunPolicy.downgrade_models),
the caller can use it (LlmCall.candidate_models), and the same call's estimate
on it fits what the budget has left. They are listed cheapest first; an
automatic downgrade takes the priciest that fits, the smallest step down from
what was asked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from runcap_server.estimates import Estimate, LlmCall, estimate
from runcap_server.prices import ModelPrice

# Listed in a response; a downgrade may pick from all of them.
MAX_LISTED = 5


@dataclass(frozen=True, slots=True)
class Alternative:
    price: ModelPrice
    estimate: Estimate


def capable(price: ModelPrice, call: LlmCall) -> bool:
    """Whether the model can do what the call needs."""
    context = max(call.min_context_tokens or 0, call.input_tokens)
    return (
        (price.tools or not call.needs_tools)
        and (price.json_schema or not call.needs_json_schema)
        and call.modalities <= price.modalities
        and (not context or (price.context_window or 0) >= context)
    )


def find(
    call: LlmCall,
    models: Iterable[tuple[ModelPrice, str]],
    remaining_micros: int,
    *,
    allowed: frozenset[str],
    default_max_output: int,
    max_output_cap: int,
) -> list[Alternative]:
    """Every alternative to `call` among `models` (each with its price table
    version) whose estimate fits `remaining_micros`, cheapest first."""
    found = []
    for price, version in models:
        if (price.provider, price.model) == (call.provider, call.model):
            continue
        name = f"{price.provider}/{price.model}"
        if (allowed and name not in allowed) or (call.candidates and name not in call.candidates):
            continue
        if not capable(price, call):
            continue
        priced = estimate(
            price,
            version,
            call.on(price.provider, price.model),
            default_max_output=default_max_output,
            max_output_cap=max_output_cap,
        )
        if priced.amount_micros <= remaining_micros:
            found.append(Alternative(price, priced))
    found.sort(key=lambda a: (a.estimate.amount_micros, a.price.provider, a.price.model))
    return found
