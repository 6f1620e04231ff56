"""Reading a LiteLLM proxy request: its run, its caller, what it asks of a
model, and the usage it ended with. Pure functions of the request data."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from runcap._shared import TokenUsage

RUN_HEADER: Final = "x-runcap-run-id"
RUN_METADATA_KEY: Final = "runcap_run_id"

# runcap's id rule (server/runcap_server/validation.py): ids that break it
# (an e-mail as a user id, say) are hashed into one that keeps it.
_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# LiteLLM's provider names where the price table (genai-prices) names them otherwise.
_PROVIDERS: Final = {
    "gemini": "google",
    "vertex_ai": "google",
    "vertex_ai_beta": "google",
    "text-completion-openai": "openai",
    "azure_ai": "azure",
    "bedrock_converse": "aws",
    "bedrock": "aws",
    "mistralai": "mistral",
}


def scope_id(value: str) -> str:
    """`value` as a runcap scope id: itself when it is a valid id, else a hash."""
    if _ID.fullmatch(value):
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:40]


def request_headers(data: Mapping[str, Any]) -> dict[str, str]:
    """The client's request headers, lower-cased."""
    request = data.get("proxy_server_request") or {}
    headers = request.get("headers") or {}
    return {str(key).lower(): str(value) for key, value in headers.items()}


def metadata_of(data: dict[str, Any]) -> dict[str, Any]:
    """The request's metadata dict, created when missing."""
    metadata = data.get("metadata")
    if not isinstance(metadata, dict):
        metadata = data["metadata"] = {}
    return metadata


def run_id_of(data: dict[str, Any]) -> str:
    """The run the request names (header, then metadata), or ""."""
    header = request_headers(data).get(RUN_HEADER, "").strip()
    if header:
        return header
    return str(metadata_of(data).get(RUN_METADATA_KEY) or "").strip()


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller as runcap scopes: LiteLLM's key hash, user and team."""

    api_key_id: str = ""
    user_id: str = ""
    team_id: str = ""

    @classmethod
    def of(cls, key: Any, data: Mapping[str, Any]) -> Identity:
        """From LiteLLM's UserAPIKeyAuth; the request's `user` (an end user)
        stands in for a key with no user."""
        api_key = getattr(key, "api_key", None) or getattr(key, "token", None) or ""
        user = getattr(key, "user_id", None) or data.get("user") or ""
        team = getattr(key, "team_id", None) or ""
        return cls(
            scope_id(str(api_key)) if api_key else "",
            scope_id(str(user)) if user else "",
            scope_id(str(team)) if team else "",
        )

    def may_use(self, api_key_id: str, user_id: str, team_id: str) -> bool:
        """Whether a run charged to these scopes belongs to this caller: every
        scope the run names must be the caller's."""
        return all(
            not theirs or theirs == ours
            for theirs, ours in (
                (api_key_id, self.api_key_id),
                (user_id, self.user_id),
                (team_id, self.team_id),
            )
        )


@dataclass(frozen=True, slots=True)
class Deployment:
    """A model group's deployment, as runcap prices it."""

    group: str
    provider: str
    model: str
    litellm_model: str


def deployment_of(entry: Mapping[str, Any]) -> Deployment | None:
    """A router model-list entry as runcap names it: `model_info.runcap_provider`
    and `model_info.runcap_model` when set, else from `litellm_params.model`."""
    params = entry.get("litellm_params") or {}
    info = entry.get("model_info") or {}
    litellm_model = str(params.get("model") or "")
    provider = str(info.get("runcap_provider") or "")
    model = str(info.get("runcap_model") or "")
    if not (provider and model):
        if not litellm_model:
            return None
        prefix, _, rest = litellm_model.partition("/")
        explicit = params.get("custom_llm_provider")
        if explicit:
            provider, model = str(explicit), rest if prefix == explicit else litellm_model
        elif rest:
            provider, model = prefix, rest
        else:
            provider, model = "openai", litellm_model
        provider = _PROVIDERS.get(provider, provider)
    return Deployment(str(entry.get("model_name") or ""), provider, model, litellm_model)


def needs_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """What the call needs from a model (LlmCall capability fields)."""
    response_format = data.get("response_format") or {}
    modalities: set[str] = set()
    for message in data.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind in ("image_url", "image"):
                    modalities.add("image")
                elif kind in ("input_audio", "audio"):
                    modalities.add("audio")
                elif kind in ("video_url", "video"):
                    modalities.add("video")
    return {
        "needs_tools": bool(data.get("tools") or data.get("functions")),
        "needs_json_schema": isinstance(response_format, Mapping)
        and response_format.get("type") == "json_schema",
        "modalities": sorted(modalities),
    }


def max_output_of(data: Mapping[str, Any]) -> int | None:
    """The request's output cap, or None (the server's default applies)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _number(source: Any, name: str) -> int:
    value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _part(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)


def usage_of(usage: Any) -> TokenUsage | None:
    """An OpenAI-shaped usage (LiteLLM's `Usage`, or its dict) as runcap's
    disjoint token classes, or None when there is none. Prompt tokens include
    cache reads and writes; completion tokens include reasoning."""
    if usage is None:
        return None
    prompt = _number(usage, "prompt_tokens")
    completion = _number(usage, "completion_tokens")
    prompt_details = _part(usage, "prompt_tokens_details")
    completion_details = _part(usage, "completion_tokens_details")
    cache_read = _number(prompt_details, "cached_tokens") if prompt_details else 0
    cache_write = (_number(prompt_details, "cache_write_tokens") if prompt_details else 0) or (
        _number(usage, "cache_creation_input_tokens")
    )
    reasoning = _number(completion_details, "reasoning_tokens") if completion_details else 0
    return TokenUsage(
        input_tokens=max(0, prompt - cache_read - cache_write),
        output_tokens=max(0, completion - reasoning),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=reasoning,
    )


def streamed_text(chunks: Iterable[Any]) -> str:
    """The text (content, tool-call arguments) a stream sent so far."""
    parts: list[str] = []
    for chunk in chunks:
        for choice in _part(chunk, "choices") or ():
            delta = _part(choice, "delta")
            if delta is None:
                continue
            content = _part(delta, "content")
            if isinstance(content, str):
                parts.append(content)
            for call in _part(delta, "tool_calls") or ():
                function = _part(call, "function")
                arguments = _part(function, "arguments") if function is not None else None
                if isinstance(arguments, str):
                    parts.append(arguments)
    return "".join(parts)
