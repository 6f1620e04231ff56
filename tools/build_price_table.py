"""Build server/runcap_server/price_table.json, the price table the server reads.

    python tools/build_price_table.py [--as-of YYYY-MM-DD] [--litellm-json PATH]

`make prices` installs what it needs (the `tools` extra) and runs it; it needs
the network (PyPI). CI never runs it: the output is committed, and the server
only reads the committed file.

Sources:

- Prices from the `genai-prices` package (pinned below; its version must match).
  Its Decimal USD per million tokens become integer micro-USD per million tokens,
  exactly: a price that is not a whole number of micro-USD skips the model with a
  warning, nothing is rounded.
- Capabilities from LiteLLM's model map, read as data from the `litellm` wheel
  (the pinned LITELLM_VERSION, downloaded with `pip download --no-deps`, never
  imported), or from a copy of its model_prices_and_context_window_backup.json
  given with --litellm-json. A model is matched only by its exact genai-prices id
  under the LiteLLM provider(s) that serve the same API (`LITELLM_ROUTES`). An
  unmatched model gets conservative capabilities: no tools, no JSON schema, text
  only, no known output limit, and genai-prices' context window if it has one.

What is kept, and how prices that runcap's five rates cannot express are handled
(every case is counted in the summary printed at the end):

- Only text-generation models with input and output token prices: LiteLLM's mode
  must be chat, completion or responses; unmatched models whose id names another
  kind of model (tts, embedding, image, ...) are skipped.
- Prices that change on a date are resolved as of --as-of (default: today, UTC);
  a change scheduled after it is reported (rebuild after that date).
- Time-of-day prices, per-request fees, and non-token units are skipped.
- Tiered prices (higher rates for a prompt of more than N input tokens) become
  the entry's `tiers`, ascending: {"above_input_tokens": N, and all five
  rates}. genai-prices' rule is kept: a tier applies when the call's input
  tokens, cached ones included, are greater than its `start` (N), and then to
  every token of the call, not only to those past N (genai_prices.types:
  `TieredPrices`, `calc_unit_price`, `ModelPrice.calc_price`). Each price key
  is tiered on its own in genai-prices; a runcap tier is written for every
  threshold any of the five rates changes at, carrying for each class its own
  price at that threshold, the base one if the class is not tiered. A class
  with no price of its own follows the tier's input (cache) or output
  (reasoning) rate, as the base rates do. Such models are counted.
- Input priced per modality (audio, image, video tokens): that modality is left
  out of the model's `modalities`, which lists only inputs priced at its rates.
  Output priced per modality (audio, image, video) skips the model.
- Request variants (batch, service tiers, fast mode, regions): the standard
  price is used. Server-side tool fees (web search) and one-hour cache writes
  are not part of the rates (cache_write is the standard, five-minute, write).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "server" / "runcap_server" / "price_table.json"

GENAI_PRICES_VERSION = "0.2.3"
LITELLM_VERSION = "1.109.1"
LITELLM_MEMBER = "litellm/model_prices_and_context_window_backup.json"

MICROS_PER_USD = 1_000_000
TEXT_MODES = frozenset({"chat", "completion", "responses"})
MODALITIES = ("text", "image", "audio", "video")

# genai-prices provider id -> (LiteLLM litellm_provider, key prefix), tried in
# order: a model matches the first LiteLLM entry whose key is the prefix plus its
# exact genai-prices id and whose litellm_provider is the one named.
LITELLM_ROUTES: dict[str, tuple[tuple[str, str], ...]] = {
    "anthropic": (("anthropic", ""), ("anthropic", "anthropic/")),
    "aws": (
        ("bedrock_converse", ""),
        ("bedrock", ""),
        ("bedrock_converse", "bedrock/"),
        ("bedrock", "bedrock/"),
    ),
    "azure": (("azure", "azure/"),),
    "baseten": (("baseten", "baseten/"),),
    "cerebras": (("cerebras", "cerebras/"),),
    "cloudflare": (("cloudflare", "cloudflare/"),),
    "cohere": (("cohere_chat", ""), ("cohere", ""), ("cohere", "cohere/")),
    "databricks": (("databricks", "databricks/"),),
    "deepseek": (("deepseek", ""), ("deepseek", "deepseek/")),
    "fireworks": (("fireworks_ai", "fireworks_ai/accounts/fireworks/models/"),),
    "github-copilot": (("github_copilot", "github_copilot/"),),
    "google": (
        ("gemini", "gemini/"),
        ("vertex_ai-language-models", ""),
        ("vertex_ai-anthropic_models", "vertex_ai/"),
    ),
    "groq": (("groq", "groq/"),),
    "meta": (("meta", "meta/"),),
    "minimax": (("minimax", "minimax/"),),
    "mistral": (("mistral", "mistral/"),),
    "moonshotai": (("moonshot", "moonshot/"),),
    "novita": (("novita", "novita/"),),
    "openai": (("openai", ""), ("text-completion-openai", "")),
    "ovhcloud": (("ovhcloud", "ovhcloud/"),),
    "perplexity": (("perplexity", "perplexity/"), ("perplexity", "")),
    "together": (("together_ai", "together_ai/"),),
    "typesafe": (("typesafe", "typesafe/"),),
    "x-ai": (("xai", "xai/"),),
    "zai": (("zai", "zai/"),),
}

# genai-prices price keys -> what the table does with them.
RATE_KEYS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "output_reasoning_mtok": "reasoning",
}
# Used for cache_write when the model has no plain cache write price.
CACHE_WRITE_5M = "cache_write_5m_mtok"
# Input priced per modality: the modality is left out of `modalities`.
MODALITY_INPUT_KEYS = {
    "input_audio_mtok": "audio",
    "cache_audio_read_mtok": "audio",
    "cache_audio_write_mtok": "audio",
    "input_image_mtok": "image",
    "cache_image_read_mtok": "image",
    "cache_image_write_mtok": "image",
    "input_video_mtok": "video",
    "cache_video_read_mtok": "video",
    "cache_video_write_mtok": "video",
}
# Add-ons outside the token rates: kept, and reported.
ADDON_KEYS = {
    "web_searches_kcount": "server-side tool fees (web/file/social search, code execution)",
    "storage_searches_kcount": "server-side tool fees (web/file/social search, code execution)",
    "social_searches_kcount": "server-side tool fees (web/file/social search, code execution)",
    "code_executions_kcount": "server-side tool fees (web/file/social search, code execution)",
    "cache_write_1h_mtok": "one-hour cache writes priced apart (cache_write is the 5-minute rate)",
}
# The table's name for a tier's threshold: the tier applies above it (">", as genai-prices).
THRESHOLD = "above_input_tokens"
# Names of unmatched models that are not text generation.
NON_TEXT_WORDS = frozenset(
    {"tts", "transcribe", "whisper", "embed", "embedding", "rerank", "reranker", "image"}
    | {"moderation", "speech", "sonic", "audio", "realtime", "live", "omni"}
)


@dataclass
class Report:
    written: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: list[str] = field(default_factory=list)
    pending: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason].append(name)
        self.pending.clear()

    def note(self, what: str, name: str) -> None:
        """Notes a kept model's caveat (pending until `keep`)."""
        self.pending.append((what, name))

    def keep(self) -> None:
        for what, name in dict.fromkeys(self.pending):
            self.notes[what].append(name)
        self.pending.clear()
        self.written += 1

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)


class Skip(Exception):
    """The model cannot be priced with runcap's rates; the message says why."""


def micros_per_mtok(price: Decimal, what: str) -> int:
    """USD per million tokens -> integer micro-USD per million tokens, exactly."""
    if not isinstance(price, Decimal) or not price.is_finite() or price < 0:
        raise Skip(f"{what} is not a finite non-negative Decimal: {price!r}")
    numerator, denominator = price.as_integer_ratio()
    micros, remainder = divmod(numerator * MICROS_PER_USD, denominator)
    if remainder:
        raise Skip(f"{what} = ${price}/MTok is not a whole number of micro-USD per MTok")
    return micros


def resolve_prices(model: Any, as_of: dt.date, name: str, report: Report) -> Any:
    """The model's standard ModelPrice on `as_of` (genai-prices' own rule:
    the last conditional price whose constraint holds)."""
    from genai_prices import types

    prices = model.prices
    if isinstance(prices, types.ModelPrice):
        return prices
    constraints = [conditional.constraint for conditional in prices]
    if any(isinstance(c, types.TimeOfDateConstraint) for c in constraints):
        raise Skip("prices depend on the time of day")
    chosen = prices[0].prices
    for conditional in reversed(prices):
        constraint = conditional.constraint
        if constraint is None or constraint.start_date <= as_of:
            chosen = conditional.prices
            break
    later = sorted(c.start_date for c in constraints if isinstance(c, types.StartDateConstraint))
    later = [day for day in later if day > as_of]
    if later:
        report.note(f"price changes scheduled after {as_of} (rebuild then)", f"{name} {later[0]}")
    else:
        report.note(f"prices that changed over time, resolved as of {as_of}", name)
    return chosen


def price_entry(
    provider_id: str, model: Any, as_of: dt.date, litellm: Mapping[str, Any], report: Report
) -> dict[str, Any]:
    from genai_prices import types

    name = f"{provider_id}/{model.id}"
    prices = resolve_prices(model, as_of, name, report)
    values = {
        key: value
        for key, value in vars(prices).items()
        if value is not None and not key.startswith("_")
    }
    if "input_mtok" not in values or "output_mtok" not in values:
        raise Skip("no input and output token prices")

    rates: dict[str, int] = {}
    tiered: dict[str, tuple[str, Any]] = {}
    priced_apart: set[str] = set()
    for key in sorted(values):
        value = values[key]
        if key in ADDON_KEYS:
            report.note(ADDON_KEYS[key], name)
            continue
        if key in MODALITY_INPUT_KEYS:
            priced_apart.add(MODALITY_INPUT_KEYS[key])
            continue
        target = RATE_KEYS.get(key)
        if key == CACHE_WRITE_5M and "cache_write_mtok" not in values:
            target = "cache_write"
        if target is None:
            raise Skip(f"price {key} cannot be expressed in runcap's rates")
        if isinstance(value, types.TieredPrices):
            tiered[target] = (key, value)
            value = value.base
        rates[target] = micros_per_mtok(value, key)
    tiers = tier_entries(rates, tiered)
    if tiers:
        thresholds = ", ".join(f">{tier[THRESHOLD]}" for tier in tiers)
        report.note(
            "tiered prices: kept as `tiers` (higher rates above N input tokens)",
            f"{name} ({thresholds})",
        )
    if model.price_variants:
        report.note("request variants (batch, service tier, fast mode): standard price", name)
    rates = with_defaults(rates)

    entry = litellm_entry(provider_id, model.id, litellm)
    if entry is None:
        non_text = sorted(id_words(model.id) & NON_TEXT_WORDS)
        if non_text:
            raise Skip(f"no LiteLLM entry and the id names a non-text model ({non_text[0]})")
        report.note("no exact LiteLLM match: conservative capabilities", name)
        context_window = positive(model.context_window)
        max_output_tokens = None
        tools = json_schema = False
        modalities = {"text"}
    else:
        mode = entry.get("mode")
        if mode not in TEXT_MODES:
            raise Skip(f"LiteLLM mode is {mode!r}, not text generation")
        context_window = positive(entry.get("max_input_tokens")) or positive(model.context_window)
        max_output_tokens = positive(entry.get("max_output_tokens"))
        tools = entry.get("supports_function_calling") is True
        json_schema = entry.get("supports_response_schema") is True
        modalities = litellm_modalities(entry)
    if priced_apart:
        report.note(
            "input priced per modality: modality left out of `modalities`",
            f"{name} ({', '.join(sorted(priced_apart))})",
        )
    return {
        "provider": provider_id,
        "model": model.id,
        **rates,
        "context_window": context_window,
        "max_output_tokens": max_output_tokens,
        "tools": tools,
        "json_schema": json_schema,
        "modalities": sorted(modalities - priced_apart),
        **({"tiers": tiers} if tiers else {}),
    }


def with_defaults(rates: Mapping[str, int]) -> dict[str, int]:
    """All five rates: a class without a price of its own is billed as plain
    input (cache reads and writes) or output (reasoning), as genai-prices bills
    it (its tokens stay in the input or output count)."""
    return {
        **rates,
        "cache_read": rates.get("cache_read", rates["input"]),
        "cache_write": rates.get("cache_write", rates["input"]),
        "reasoning": rates.get("reasoning", rates["output"]),
    }


def tier_entries(
    base: Mapping[str, int], tiered: Mapping[str, tuple[str, Any]]
) -> list[dict[str, int]]:
    """genai-prices' per-price tiers as the table's `tiers`: one for each
    threshold any rate is tiered at, with every class's rate for a prompt just
    above it (that class's last tier starting at or below the threshold, else
    its base rate). A tier that changes nothing is left out."""
    thresholds = sorted({tier.start for _, prices in tiered.values() for tier in prices.tiers})
    tiers: list[dict[str, int]] = []
    previous = with_defaults(base)
    for threshold in thresholds:
        if type(threshold) is not int or threshold < 0:
            raise Skip(f"a tier starts at {threshold!r}, not a non-negative number of tokens")
        rates = dict(base)
        for target, (key, prices) in tiered.items():
            price = prices.base
            for tier in sorted(prices.tiers, key=lambda tier: tier.start):
                if tier.start <= threshold:
                    price = tier.price
            rates[target] = micros_per_mtok(price, f"{key} above {threshold} input tokens")
        rates = with_defaults(rates)
        if rates != previous:
            tiers.append({THRESHOLD: threshold, **rates})
        previous = rates
    return tiers


def id_words(model_id: str) -> set[str]:
    for separator in "/_.:@":
        model_id = model_id.replace(separator, "-")
    return set(model_id.lower().split("-"))


def positive(value: object) -> int | None:
    return value if type(value) is int and value > 0 else None


def litellm_entry(provider_id: str, model_id: str, litellm: Mapping[str, Any]) -> Any:
    for litellm_provider, prefix in LITELLM_ROUTES.get(provider_id, ()):
        entry = litellm.get(prefix + model_id)
        if isinstance(entry, dict) and entry.get("litellm_provider") == litellm_provider:
            return entry
    return None


def litellm_modalities(entry: Mapping[str, Any]) -> set[str]:
    found = {"text"}
    listed = entry.get("supported_modalities")
    if isinstance(listed, list):
        found.update(m for m in listed if m in MODALITIES)
    for flag, modality in (
        ("supports_vision", "image"),
        ("supports_audio_input", "audio"),
        ("supports_video_input", "video"),
    ):
        if entry.get(flag) is True:
            found.add(modality)
    return found


def read_litellm(json_path: Path | None, version: str) -> tuple[bytes, str]:
    """LiteLLM's model map (bytes) and where it came from."""
    if json_path is not None:
        return json_path.read_bytes(), f"{json_path.name} (given with --litellm-json)"
    with tempfile.TemporaryDirectory(prefix="runcap-litellm-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--only-binary=:all:", "--dest", scratch, f"litellm=={version}"]
        print(f"downloading litellm=={version} (a wheel, read as data, not imported)")
        subprocess.run(command, check=True)
        wheels = sorted(Path(scratch).glob("litellm-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"error: expected one litellm wheel, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(LITELLM_MEMBER), f"{wheels[0].name}:{LITELLM_MEMBER}"


def render(document: Mapping[str, Any]) -> str:
    """Sorted keys, one model per line, so diffs show which models changed."""

    def compact(value: object) -> str:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))

    lines = ["{"]
    for key in sorted(document):
        if key == "models":
            rows = [f"    {compact(model)}" for model in document[key]]
            lines.append('  "models": [\n' + ",\n".join(rows) + "\n  ],")
        else:
            lines.append(f"  {json.dumps(key)}: {compact(document[key])},")
    lines[-1] = lines[-1].rstrip(",")
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_summary(report: Report, output: Path, version: str, tiered: int) -> None:
    where = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    print(f"\nwrote {report.written} models ({tiered} with tiers) to {where}")
    print(f"version {version}")
    skipped = sum(len(names) for names in report.skipped.values())
    print(f"\nskipped {skipped} models:")
    for reason, names in sorted(report.skipped.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        print(f"  {len(names):5}  {reason}: {shown}")
    print("\nkept, with notes:")
    for what, names in sorted(report.notes.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        print(f"  {len(names):5}  {what}: {shown}")
    if report.warnings:
        print(f"\n{len(report.warnings)} warnings (printed above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--as-of", type=dt.date.fromisoformat, help="default: today (UTC)")
    parser.add_argument("--litellm-json", type=Path, help="LiteLLM's model map (no download)")
    parser.add_argument("--litellm-version", default=LITELLM_VERSION, help="%(default)s")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="%(default)s")
    args = parser.parse_args(argv)

    installed = importlib.metadata.version("genai-prices")
    if installed != GENAI_PRICES_VERSION:
        print(
            f"error: genai-prices {installed} is installed, the table is built with "
            f"{GENAI_PRICES_VERSION}: pip install -e '.[tools]'",
            file=sys.stderr,
        )
        return 1
    from genai_prices.data import providers

    as_of: dt.date = args.as_of or dt.datetime.now(dt.UTC).date()
    raw, litellm_source = read_litellm(args.litellm_json, args.litellm_version)
    litellm = json.loads(raw)

    report = Report()
    models: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for provider in providers:
        for model in provider.models:
            name = f"{provider.id}/{model.id}"
            try:
                entry = price_entry(provider.id, model, as_of, litellm, report)
            except Skip as skip:
                reason = str(skip)
                if "whole number of micro-USD" in reason:
                    report.warn(f"skipping {name}: {reason}")
                    reason = "a price is not a whole number of micro-USD per MTok"
                report.skip(reason, name)
                continue
            key = (entry["provider"], entry["model"])
            if key in seen:
                raise SystemExit(f"error: genai-prices lists {name} twice")
            seen.add(key)
            models.append(entry)
            report.keep()
    models.sort(key=lambda entry: (entry["provider"], entry["model"]))

    canonical = json.dumps(models, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).hexdigest()[:12]
    version = (
        f"{as_of.isoformat()}+genai-prices-{GENAI_PRICES_VERSION}"
        f"+litellm-{args.litellm_version}+{digest}"
    )
    document = {
        "comment": (
            "Generated by tools/build_price_table.py (make prices); do not edit. Rates are "
            "integer micro-USD per 1,000,000 tokens; modalities are the inputs priced at them; "
            "a model's tiers give all its rates for a prompt of more than above_input_tokens "
            "input tokens (cached ones included)."
        ),
        "version": version,
        "sources": {
            "genai-prices": {"package": f"genai-prices=={GENAI_PRICES_VERSION}"},
            "litellm": {
                "package": f"litellm=={args.litellm_version}",
                "file": litellm_source,
                "sha256": hashlib.sha256(raw).hexdigest(),
            },
            "prices_as_of": as_of.isoformat(),
        },
        "models": models,
    }
    text = render(document)
    # The server's own loader must accept what was built.
    sys.path.insert(0, str(ROOT / "server"))
    from runcap_server.prices import PriceTable

    table = PriceTable.parse(text.encode(), str(args.output))
    read_back = [(m.provider, m.model, len(m.tiers)) for m in table.models()]
    built = [(m["provider"], m["model"], len(m.get("tiers", ()))) for m in models]
    if read_back != built or table.version != version:
        raise SystemExit("error: the server's loader read something else than was built")
    args.output.write_text(text, encoding="utf-8")
    tiered = sum(1 for model in models if "tiers" in model)
    print_summary(report, args.output.resolve(), version, tiered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
