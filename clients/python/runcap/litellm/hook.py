"""The LiteLLM proxy callback: reserve before each LLM call, commit its usage
after, refund on failure, and budget headers on every response.

Register it in the proxy's config.yaml::

    litellm_settings:
      callbacks: ["runcap.litellm.budget_hook"]

Settings come from RUNCAP_* variables (`runcap.litellm.settings`). See
docs/litellm.md.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

import grpc
import litellm
from litellm.integrations.custom_logger import CustomLogger
from litellm.proxy._types import ProxyException

from runcap._shared import LlmCall, RetryPolicy, RunPolicy, TokenUsage
from runcap.aio import AsyncRuncapClient
from runcap.errors import (
    InvalidArgumentError,
    RunAlreadyExistsError,
    RuncapError,
    RunNotFoundError,
)
from runcap.litellm import calls, middleware
from runcap.litellm.problem import (
    PROBLEM_KEY,
    ScopeFigures,
    alternative_entry,
    budget_headers,
    enum_name,
    outcome_of,
    problem_body,
    simple_problem,
)
from runcap.litellm.settings import HookSettings
from runcap.v1 import budget_pb2
from runcap.v1 import budget_service_pb2 as pb

_log = logging.getLogger("runcap.litellm")

RECORD_KEY: Final = "runcap"
"""Where the hook keeps a call's budget record in the request's metadata
(plain JSON, so LiteLLM's loggers can store it with the call)."""

# The call types that go to a chat or text model; the others (embeddings,
# images, audio...) are not budgeted by this hook.
BUDGETED_CALL_TYPES: Final = frozenset(
    {"completion", "acompletion", "text_completion", "atext_completion"}
)
_UNREACHABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_PASSES: Final = frozenset({budget_pb2.DECISION_ALLOW, budget_pb2.DECISION_WARN})
_RUN_CACHE_SIZE: Final = 65_536
_MAX_CANDIDATES: Final = 256  # LlmCall.candidate_models
# Fail fast: the call waits on runcap, so a short retry beats a long one.
_RETRY: Final = RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.2)


class RuncapBudgetHook(CustomLogger):  # type: ignore[misc]
    """A LiteLLM `CustomLogger` that puts each LLM call through runcap.

    Args:
        settings: How to reach runcap and answer clients; None reads them
            from the environment.
        client: An `AsyncRuncapClient` to use (the hook opens one otherwise,
            in the proxy's event loop, on first use).
        app: The ASGI app to install the problem+json middleware on; None for
            LiteLLM's proxy app, False for none.
    """

    def __init__(
        self,
        settings: HookSettings | None = None,
        *,
        client: AsyncRuncapClient | None = None,
        app: Any = None,
    ) -> None:
        super().__init__()
        self.settings = settings or HookSettings.from_env()
        self._client = client
        # Run id -> its (api key, user, team) scopes: a run's scopes never change.
        self._run_scopes: OrderedDict[str, tuple[str, str, str]] = OrderedDict()
        self._settling: set[asyncio.Task[None]] = set()
        self.failed_open = 0
        if app is None:
            from litellm.proxy import proxy_server

            app = proxy_server.app
        if app is not False:
            middleware.install(app)

    @property
    def client(self) -> AsyncRuncapClient:
        if self._client is None:
            self._client = AsyncRuncapClient(
                self.settings.target,
                timeout=self.settings.timeout_s,
                retry=_RETRY,
                api_key=self.settings.api_key,
            )
        return self._client

    # --- before the call -------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: str
    ) -> dict[str, Any]:
        if call_type not in BUDGETED_CALL_TYPES:
            return data
        try:
            await self._admit(user_api_key_dict, data)
        except RuncapError as error:
            if error.code not in _UNREACHABLE:
                raise self._refusal(_error_problem(error, self.settings), {}) from error
            if not self.settings.fail_open:
                raise self._refusal(
                    simple_problem(
                        503,
                        "budget_authority_unavailable",
                        "The budget authority is unreachable",
                        f"runcap at {self.settings.target} did not answer ({error.message}); "
                        "calls are refused until it does (fail closed).",
                        type_base=self.settings.problem_type_base,
                    ),
                    {"X-Budget-Decision": "unavailable"},
                ) from error
            self.failed_open += 1
            _log.warning(
                "runcap unreachable, forwarding the call unbudgeted (fail open, %d so far): %s",
                self.failed_open,
                error.message,
            )
            calls.metadata_of(data)[RECORD_KEY] = {"decision": "fail_open"}
        return data

    async def _admit(self, key: Any, data: dict[str, Any]) -> None:
        identity = calls.Identity.of(key, data)
        run_id = await self._bind_run(calls.run_id_of(data), identity, data)
        group = str(data.get("model") or "")
        deployment = self._deployment(group)
        candidates = await self._candidates(key)
        call = LlmCall(
            provider=deployment.provider,
            model=deployment.model,
            input_tokens=_input_tokens(deployment.litellm_model, data),
            max_output_tokens=calls.max_output_of(data),
            candidate_models=sorted(candidates),
            **calls.needs_of(data),
        )
        reservation_id = str(data.get("litellm_call_id") or uuid.uuid4())
        response = await self.client.reserve_once(
            run_id,
            llm_call=call,
            reservation_id=reservation_id,
            ttl=self.settings.reservation_ttl_s,
        )
        record = _record(run_id, response, group)
        calls.metadata_of(data)[RECORD_KEY] = record
        if response.decision in _PASSES:
            return
        if response.decision == budget_pb2.DECISION_DOWNGRADE:
            target = candidates.get(f"{response.estimate.provider}/{response.estimate.model}")
            if target is not None:
                record["selected_model"] = data["model"] = target
                _log.info("runcap: run %s downgraded %s to %s", run_id, group, target)
                return
            # runcap held the stand-in, but this caller may not use it here.
            await self._settle(record, None)
        raise await self._block(response, candidates, run_id, record)

    async def _bind_run(self, run_id: str, identity: calls.Identity, data: dict[str, Any]) -> str:
        """The run to charge, checked against the caller's identity; created
        (bound to the caller) when it is new and the settings allow."""
        if not run_id:
            if not self.settings.create_runs:
                raise self._refusal(
                    simple_problem(
                        400,
                        "run_id_required",
                        "The request names no run",
                        f"Send the run's id in the {calls.RUN_HEADER} header or in "
                        f"metadata.{calls.RUN_METADATA_KEY}.",
                        type_base=self.settings.problem_type_base,
                    ),
                    {},
                )
            run_id = "litellm-" + str(data.get("litellm_call_id") or uuid.uuid4())
        scopes = self._run_scopes.get(run_id)
        if scopes is None:
            scopes = await self._run_of(run_id, identity, data)
            self._run_scopes[run_id] = scopes
            if len(self._run_scopes) > _RUN_CACHE_SIZE:
                self._run_scopes.popitem(last=False)
        else:
            self._run_scopes.move_to_end(run_id)
        if not identity.may_use(*scopes):
            raise self._refusal(
                simple_problem(
                    403,
                    "run_of_another_caller",
                    "The run belongs to another caller",
                    f"Run {run_id} is charged to another API key, user or team.",
                    type_base=self.settings.problem_type_base,
                ),
                {"X-Run-Id": run_id},
            )
        return run_id

    async def _run_of(
        self, run_id: str, identity: calls.Identity, data: Mapping[str, Any]
    ) -> tuple[str, str, str]:
        try:
            run = (await self.client.get_run(run_id)).run
        except RunNotFoundError:
            if not self.settings.create_runs:
                raise self._refusal(
                    simple_problem(
                        404,
                        "run_not_found",
                        "runcap does not know this run",
                        f"Run {run_id} does not exist; create it with runcap first.",
                        type_base=self.settings.problem_type_base,
                    ),
                    {"X-Run-Id": run_id},
                ) from None
            policy = None
            if self.settings.run_mode is not None or self.settings.auto_downgrade:
                policy = RunPolicy(
                    enforcement_mode=self.settings.run_mode or "hard_gate",
                    auto_downgrade=self.settings.auto_downgrade,
                )
            try:
                run = (
                    await self.client.create_run(
                        run_id,
                        limit_micros=self.settings.run_limit_micros,
                        labels={"source": "litellm"},
                        api_key_id=identity.api_key_id,
                        user_id=identity.user_id,
                        team_id=identity.team_id,
                        policy=policy,
                    )
                ).run
            except RunAlreadyExistsError:  # another request created it first
                run = (await self.client.get_run(run_id)).run
        return (run.api_key_id, run.user_id, run.team_id)

    def _deployment(self, group: str) -> calls.Deployment:
        """How runcap names the model behind a model group (its first
        deployment; give `model_info.runcap_model` when that is not right)."""
        for entry in _model_list():
            if entry.get("model_name") == group:
                found = calls.deployment_of(entry)
                if found is not None:
                    return found
        found = calls.deployment_of({"model_name": group, "litellm_params": {"model": group}})
        assert found is not None
        return found

    async def _candidates(self, key: Any) -> dict[str, str]:
        """The models this proxy serves that the caller's key may call, as
        runcap names them ("provider/model") -> their model group."""
        found: dict[str, str] = {}
        for entry in _model_list():
            deployment = calls.deployment_of(entry)
            if deployment is None or len(found) >= _MAX_CANDIDATES:
                continue
            name = f"{deployment.provider}/{deployment.model}"
            if name not in found and await _key_may_call(deployment.group, key):
                found[name] = deployment.group
        return found

    async def _block(
        self,
        response: pb.ReserveResponse,
        candidates: Mapping[str, str],
        run_id: str,
        record: dict[str, Any],
    ) -> ProxyException:
        outcome = outcome_of(response, self.settings.block_status)
        alternatives = [
            alternative_entry(alternative, candidates[name])
            for alternative in response.alternatives
            if (name := f"{alternative.provider}/{alternative.model}") in candidates
        ]
        body = problem_body(
            response,
            outcome,
            await self._figures(response, run_id),
            alternatives,
            type_base=self.settings.problem_type_base,
            run_id=run_id,
        )
        headers = budget_headers(record)
        if response.HasField("retry_after"):
            seconds = -(-response.retry_after.ToMilliseconds() // 1000)
            headers["Retry-After"] = str(max(1, seconds))
        return self._refusal(body, headers)

    async def _figures(self, response: pb.ReserveResponse, run_id: str) -> ScopeFigures | None:
        """The money of the scope that refused the call: the run's from the
        answer, a parent's with one more call."""
        scope = response.blocking_scope
        if not response.HasField("blocking_scope") or (
            scope.kind == budget_pb2.SCOPE_KIND_RUN and scope.id == run_id
        ):
            return ScopeFigures.of_run(response.state)
        try:
            if scope.kind == budget_pb2.SCOPE_KIND_RUN:
                return ScopeFigures.of_run((await self.client.get_run(scope.id)).state)
            found = await self.client.get_scope(scope.kind, scope.id)
            return ScopeFigures.of_scope(found.scope, response.blocking_period)
        except RuncapError as error:
            _log.warning("runcap: could not read scope %s: %s", scope.id, error.message)
            return None

    def _refusal(self, body: dict[str, Any], headers: dict[str, str]) -> ProxyException:
        status = int(body["status"])
        return ProxyException(
            message=body["detail"],
            type="budget_error",
            param=None,
            code=status,
            headers={"X-Budget-Decision": body.get("decision", "block"), **headers},
            openai_code=body["code"],
            provider_specific_fields={PROBLEM_KEY: body},
        )

    # --- after the call --------------------------------------------------

    async def async_post_call_success_hook(
        self, data: dict[str, Any], user_api_key_dict: Any, response: Any
    ) -> Any:
        record = _held(data)
        if record is not None:
            usage = calls.usage_of(getattr(response, "usage", None))
            if usage is None:
                usage = _counted(record, _response_text(response))
            await self._settle(record, usage)
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        record = _held(request_data)
        if record is None:
            async for item in response:
                yield item
            return
        usage: Any = None
        text: list[str] = []
        try:
            async for item in response:
                usage = getattr(item, "usage", None) or usage
                text.append(calls.streamed_text([item]))
                yield item
        finally:
            # The end of the stream, a provider error, or the client gone
            # (the generator is closed or cancelled): commit what was used.
            # From a task: a cancelled generator may not await any more.
            streamed = "".join(text)
            counted: TokenUsage | None = None  # nothing came back: refund
            if usage is not None:
                counted = calls.usage_of(usage)
            elif streamed:
                counted = _counted(record, streamed)
            self._settle_later(record, counted)

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: str | None = None,
    ) -> None:
        record = _held(request_data)
        if record is not None:
            await self._settle(record, None)

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: Any,
        response: Any,
        request_headers: dict[str, str] | None = None,
        litellm_call_info: dict[str, Any] | None = None,
    ) -> dict[str, str] | None:
        record = calls.metadata_of(data).get(RECORD_KEY)
        return budget_headers(record) if isinstance(record, dict) else None

    def _settle_later(self, record: dict[str, Any], usage: TokenUsage | None) -> None:
        record["settled"] = True
        task = asyncio.get_running_loop().create_task(self._settle(record, usage, claimed=True))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(
        self, record: dict[str, Any], usage: TokenUsage | None, *, claimed: bool = False
    ) -> None:
        """Commits `usage`, or refunds when None; once per call. A failure is
        logged: the hold then expires by its TTL (and the spend is not
        recorded), which is the backstop for every lost settlement."""
        if record.get("settled") and not claimed:
            return
        record["settled"] = True
        run_id, reservation_id = record["run_id"], record["reservation_id"]
        try:
            if usage is None:
                refunded = await self.client.refund(run_id, reservation_id)
                record["remaining_micros"] = refunded.state.remaining_micros
            else:
                committed = await self.client.commit(run_id, reservation_id, usage=usage)
                record["remaining_micros"] = committed.state.remaining_micros
                record["actual_micros"] = committed.actual_micros
        except RuncapError as error:
            _log.warning(
                "runcap: could not %s %s/%s (%s); the hold expires by its TTL",
                "refund" if usage is None else "commit",
                run_id,
                reservation_id,
                error.message,
            )


def _record(run_id: str, response: pb.ReserveResponse, group: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "run_id": run_id,
        "reservation_id": response.reservation_id,
        "decision": enum_name(budget_pb2.Decision, response.decision, "DECISION_"),
        "decision_id": response.decision_id,
        "enforcement_mode": enum_name(
            budget_pb2.EnforcementMode, response.enforcement_mode, "ENFORCEMENT_MODE_"
        ),
        "remaining_micros": response.state.remaining_micros,
        "held": response.decision in _PASSES or response.decision == budget_pb2.DECISION_DOWNGRADE,
        "settled": False,
    }
    if response.HasField("estimate"):
        record["price_table_version"] = response.estimate.price_table_version
        record["input_tokens"] = response.estimate.input_tokens
    if response.HasField("blocking_scope"):
        scope = response.blocking_scope
        kind = enum_name(budget_pb2.ScopeKind, scope.kind, "SCOPE_KIND_")
        record["blocking_scope"] = f"{kind}:{scope.id}"
    if response.decision == budget_pb2.DECISION_DOWNGRADE:
        record["requested_model"] = group
    return record


def _error_problem(error: RuncapError, settings: HookSettings) -> dict[str, Any]:
    """A runcap error other than unavailability, as a problem: the request's
    fault (400) or runcap's (502)."""
    if isinstance(error, InvalidArgumentError):
        return simple_problem(
            400,
            "invalid_budget_request",
            "runcap cannot budget this request",
            error.message,
            type_base=settings.problem_type_base,
        )
    return simple_problem(
        502,
        "budget_authority_error",
        "The budget authority failed",
        f"runcap answered {error.code.name}: {error.message}",
        type_base=settings.problem_type_base,
    )


def _held(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """The call's budget record when it holds a reservation not yet settled."""
    metadata = data.get("metadata")
    record = metadata.get(RECORD_KEY) if isinstance(metadata, Mapping) else None
    if isinstance(record, dict) and record.get("held") and not record.get("settled"):
        return record
    return None


def _model_list() -> list[Mapping[str, Any]]:
    from litellm.proxy import proxy_server

    router = proxy_server.llm_router
    return list(getattr(router, "model_list", None) or ())


async def _key_may_call(group: str, key: Any) -> bool:
    from litellm.proxy import proxy_server
    from litellm.proxy.auth.auth_checks import can_key_call_model

    try:
        await can_key_call_model(
            model=group,
            llm_model_list=proxy_server.llm_model_list,
            valid_token=key,
            llm_router=proxy_server.llm_router,
        )
    except Exception:
        return False
    return True


def _input_tokens(model: str, data: Mapping[str, Any]) -> int:
    """The prompt's tokens, counted with LiteLLM's tokenizers."""
    messages = data.get("messages")
    if messages:
        return int(litellm.token_counter(model=model, messages=messages, tools=data.get("tools")))
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        prompt = "".join(str(part) for part in prompt)
    return int(litellm.token_counter(model=model, text=str(prompt or "")))


def _response_text(response: Any) -> str:
    parts: list[str] = []
    for choice in getattr(response, "choices", None) or ():
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None) if message is not None else None
        parts.append(content if isinstance(content, str) else str(getattr(choice, "text", "")))
    return "".join(parts)


def _counted(record: Mapping[str, Any], text: str) -> TokenUsage:
    """Usage counted here when the provider reported none (a stream cut
    short): the prompt as held, the text that came back."""
    output = int(litellm.token_counter(text=text)) if text else 0
    return TokenUsage(input_tokens=int(record.get("input_tokens", 0)), output_tokens=output)
