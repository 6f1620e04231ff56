"""The runcap.v1.BudgetService servicer: proto in, validated ledger call, proto out."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from runcap.v1 import budget_pb2, budget_service_pb2, budget_service_pb2_grpc
from runcap_server import alternatives, auth, convert, decisions, errors, open_runs
from runcap_server.auth import KeyStore
from runcap_server.backends.base import Backend
from runcap_server.bounded import BoundedDict
from runcap_server.errors import FieldViolation, InvalidArgument
from runcap_server.estimates import Estimate, LlmCall, Pricing, actual_micros, estimate
from runcap_server.ledger.saga import ReserveExtras
from runcap_server.ledger.types import (
    MAX_MICROS,
    ApprovalResult,
    Change,
    CreateRunResult,
    DecisionReason,
    EnforcementMode,
    Period,
    ReservationStatus,
    ReserveResult,
    RunPolicy,
    RunSpec,
    RunStatus,
    RunView,
    ScopeKind,
    ScopeRef,
)
from runcap_server.open_runs import OpenRuns
from runcap_server.page_tokens import page_cursor, page_token
from runcap_server.prices import ModelPrice, PriceBook, TokenUsage
from runcap_server.settings import Settings
from runcap_server.tenant_prices import REFRESH_S, TenantPrices
from runcap_server.validation import Validator
from runcap_server.watch import EncodedOnce, Progress, Snapshot, WatchHub, WatchItem

# Where gRPC carries the google.rpc.Status with its details.
_DETAILS_KEY = "grpc-status-details-bin"
Context = grpc.aio.ServicerContext[Any, Any]
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


async def _abort(context: Context, error: BaseException) -> NoReturn:
    code, status = errors.to_status(error)
    await context.abort(
        code,
        status.message,
        trailing_metadata=((_DETAILS_KEY, status.SerializeToString()),),
    )
    raise AssertionError("abort returned")


def _unary(handler: Handler) -> Handler:
    """Turns every exception into its one documented status (errors.to_status)."""

    name = handler.__name__

    @functools.wraps(handler)
    async def wrapped(self: BudgetServicer, request: Any, context: Context) -> Any:
        try:
            if self.keys is not None:  # no keys (--insecure-dev): nothing to check
                await self._enter(name, request, context)
            return await handler(self, request, context)
        except Exception as error:
            await _abort(context, error)

    return wrapped  # type: ignore[return-value]


class _Undecodable:
    """What the request parser hands on instead of a request it cannot parse."""

    def __init__(self, error: DecodeError) -> None:
        self.error = InvalidArgument([FieldViolation("request", f"does not parse: {error}")])


def _tolerant(handler: Any) -> Any:
    """The handler with a parser that never raises, and a behavior that
    answers an unparsable request with its INVALID_ARGUMENT."""
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler

    def deserialize(body: bytes) -> Any:
        try:
            return parse(body)
        except DecodeError as error:
            return _Undecodable(error)

    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def answer(request: Any, context: Context) -> Any:
            if isinstance(request, _Undecodable):
                await _abort(context, request.error)
            return await unary(request, context)

        return handler._replace(request_deserializer=deserialize, unary_unary=answer)
    stream = handler.unary_stream
    if not inspect.isasyncgenfunction(stream):
        return handler

    async def answers(request: Any, context: Context) -> AsyncGenerator[Any, None]:
        if isinstance(request, _Undecodable):
            await _abort(context, request.error)
        async for response in stream(request, context):
            yield response

    return handler._replace(request_deserializer=deserialize, unary_stream=answers)


# LLM-call reservations whose pricing a replica remembers for their Commit.
PRICING_CACHE_SIZE = 65_536
# Runs whose enforcement mode a replica remembers, to fail open without storage.
MODE_CACHE_SIZE = 65_536
# ListRuns pages: the default and the largest.
LIST_PAGE_SIZE = 100
MAX_LIST_PAGE_SIZE = 1000
# Runs whose API key a replica remembers, to check agents' access without a read.
OWNER_CACHE_SIZE = 65_536
log = logging.getLogger("runcap.servicer")


class _FailedOpen(Exception):
    """The storage is down and the deployment fails open: answer this."""

    def __init__(self, response: budget_service_pb2.ReserveResponse) -> None:
        super().__init__("failed open")
        self.response = response


def _new_id() -> str:
    return uuid.uuid4().hex


class BudgetServicer(budget_service_pb2_grpc.BudgetServiceServicer):
    def __init__(
        self,
        backend: Backend,
        hub: WatchHub,
        settings: Settings,
        prices: PriceBook,
        tenant_prices: TenantPrices,
        keys: KeyStore | None = None,
        open_runs: OpenRuns | None = None,
    ) -> None:
        self.backend = backend
        # Open runs per principal and the run TTL; None: not counted (embedded use).
        self.open_runs = open_runs
        # None: no authentication (--insecure-dev, or embedded use).
        self.keys = keys
        self.prices = prices
        # (tenant, run, reservation) -> pricing of LLM-call holds made here, newest last.
        self._pricings: BoundedDict[tuple[str, str, str], str] = BoundedDict(PRICING_CACHE_SIZE)
        # Each tenant's own prices; the server's tenant is refreshed by the app.
        self._tenant_prices = {settings.tenant: tenant_prices}
        self._prices_read: dict[str, float] = {}
        # (tenant, run) -> the API key id the run is charged to, for agents' access.
        self._owners: BoundedDict[tuple[str, str], str] = BoundedDict(OWNER_CACHE_SIZE)
        self.hub = hub
        # Watch events, each serialized once for all of its run's streams.
        self._encoded = EncodedOnce(lambda change: _watch_response(change).SerializeToString())
        self.settings = settings
        # (tenant, run) -> enforcement mode, newest last (only with RUNCAP_FAIL_OPEN=advisory).
        self._modes: BoundedDict[tuple[str, str], EnforcementMode] = BoundedDict(MODE_CACHE_SIZE)
        # Reserves answered without the backend (RUNCAP_FAIL_OPEN).
        self.failed_open = 0

    @property
    def tenant(self) -> str:
        """The tenant of the RPC being served: its key's, else the server's."""
        principal = auth.CALLER.get()
        return self.settings.tenant if principal is None else principal.tenant

    @property
    def tenant_prices(self) -> TenantPrices:
        return self._tenant_prices[self.tenant]

    async def _enter(self, method: str, request: Any, context: Context) -> None:
        """Authenticates the call (when keys are configured) and checks that
        its principal may make it. Sets `auth.CALLER` for the handler."""
        if self.keys is None:
            return
        principal = self.keys.authenticate(context.invocation_metadata(), context.auth_context())
        auth.CALLER.set(principal)
        role, run_of = _ACCESS[method]
        auth.require(role, method)
        tenant = principal.tenant
        if tenant != self.settings.tenant:
            await self._refresh_tenant_prices(tenant)
        if principal.role >= auth.Role.OPERATOR:
            return
        if method == "CreateRun":
            self._bind_new_run(principal, request)
        run_id = run_of(request) if run_of is not None else ""
        if run_id and await self._owner(run_id) != principal.key_id:
            raise auth.deny_run(principal, run_id)

    async def _refresh_tenant_prices(self, tenant: str) -> None:
        """Another tenant's prices, read on first use and at most once a
        second after (the server's own tenant is refreshed in the background)."""
        now = asyncio.get_running_loop().time()
        if now - self._prices_read.get(tenant, -REFRESH_S) < REFRESH_S:
            return
        prices = self._tenant_prices.setdefault(tenant, TenantPrices(self.backend, tenant))
        await prices.refresh()
        self._prices_read[tenant] = now

    def _bind_new_run(
        self, principal: auth.Principal, request: budget_service_pb2.CreateRunRequest
    ) -> None:
        """An agent's runs are charged to its own key, user and team."""
        for field, own in (
            ("api_key_id", principal.key_id),
            ("user_id", principal.user_id),
            ("team_id", principal.team_id),
        ):
            given = getattr(request, field)
            if given and given != own:
                raise errors.PermissionDenied(
                    f"an agent key creates runs for its own scopes: {field} must be "
                    f"{own!r} or empty (got {given!r})",
                    key_id=principal.key_id,
                )
            setattr(request, field, own)

    async def _owner(self, run_id: str) -> str:
        """The API key a run is charged to ("" for none, or no such run)."""
        key = (self.tenant, run_id)
        owner = self._owners.get(key)
        if owner is None:
            try:
                view = await self.backend.get_run(self.tenant, run_id)
            except errors.RunNotFound:
                return ""
            owner = view.spec.api_key_id
            self._remember_owner(run_id, owner)
        return owner

    def _remember_owner(self, run_id: str, api_key_id: str) -> None:
        self._owners[(self.tenant, run_id)] = api_key_id

    @_unary
    async def CreateRun(
        self,
        request: budget_service_pb2.CreateRunRequest,
        context: Context,
    ) -> budget_service_pb2.CreateRunResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id, required=False) or _new_id()
        limit = check.micros("limit_micros", request.limit_micros, minimum=1)
        labels = check.labels("labels", request.labels)
        ttl = check.duration_ms(
            "default_ttl",
            request.default_ttl if request.HasField("default_ttl") else None,
            max_ms=self.settings.max_ttl_ms,
        )
        parent = check.identifier("parent_run_id", request.parent_run_id, required=False)
        if parent and parent == run_id:
            check.fail("parent_run_id", "must not be the run itself")
        spec = RunSpec(
            run_id,
            limit,
            labels,
            ttl,
            parent_run_id=parent,
            api_key_id=check.identifier("api_key_id", request.api_key_id, required=False),
            user_id=check.identifier("user_id", request.user_id, required=False),
            team_id=check.identifier("team_id", request.team_id, required=False),
            policy=check.policy("policy", request.policy) if request.HasField("policy") else None,
        )
        check.done()
        result = await self._create_counted(spec)
        self._remember_mode(run_id, result.run.policy.mode)
        self._remember_owner(run_id, result.run.spec.api_key_id)
        return budget_service_pb2.CreateRunResponse(
            run=convert.run_pb(result.run),
            state=convert.state_pb(result.run.state),
            replayed=result.replayed,
        )

    async def _create_counted(self, spec: RunSpec) -> CreateRunResult:
        """create_run, with the run counted against its creator's open runs."""
        if self.open_runs is None:
            return await self.backend.create_run(self.tenant, spec)
        caller = auth.CALLER.get()
        principal = caller.key_id if caller is not None else open_runs.ANONYMOUS
        admission = await self.open_runs.admit(self.tenant, principal, spec.run_id)
        try:
            result = await self.backend.create_run(self.tenant, spec)
        except BaseException:
            if admission is open_runs.Admission.NEW:
                await self.open_runs.release(self.tenant, spec.run_id)
            raise
        if result.run.state.status is RunStatus.CLOSED:  # a retry after the close
            await self.open_runs.release(self.tenant, spec.run_id)
        return result

    @_unary
    async def GetRun(
        self,
        request: budget_service_pb2.GetRunRequest,
        context: Context,
    ) -> budget_service_pb2.GetRunResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id)
        check.done()
        view = await self.backend.get_run(self.tenant, run_id)
        self._remember_mode(run_id, view.policy.mode)
        return budget_service_pb2.GetRunResponse(
            run=convert.run_pb(view), state=convert.state_pb(view.state)
        )

    @_unary
    async def ListRuns(
        self,
        request: budget_service_pb2.ListRunsRequest,
        context: Context,
    ) -> budget_service_pb2.ListRunsResponse:
        check = Validator()
        if not request.HasField("created_after"):
            check.fail("created_after", "is required")
        from_ms = check.timestamp_ms("created_after", request.created_after)
        to_ms = (
            check.timestamp_ms("created_before", request.created_before)
            if request.HasField("created_before")
            else 2**53
        )
        if from_ms is not None and to_ms is not None and to_ms <= from_ms:
            check.fail("created_before", "must be after created_after")
        size = request.page_size or LIST_PAGE_SIZE
        if not 0 < size <= MAX_LIST_PAGE_SIZE:
            check.fail("page_size", f"must be between 1 and {MAX_LIST_PAGE_SIZE} (got {size})")
        query = f"{from_ms}:{to_ms}"
        after = page_cursor(request.page_token, query) if request.page_token else None
        if request.page_token and after is None:
            check.fail("page_token", "is not a token of this query (same created_after and before)")
        check.done()
        assert from_ms is not None
        assert to_ms is not None
        ids = await self.backend.list_run_ids(self.tenant, from_ms, to_ms, after, size)

        async def view(run_id: str) -> RunView | None:
            try:
                return await self.backend.get_run(self.tenant, run_id)
            except errors.RunNotFound:  # aged out since it was listed
                await self.backend.forget_listed_run(self.tenant, run_id)
                return None

        views = await asyncio.gather(*(view(run_id) for _, run_id in ids))
        response = budget_service_pb2.ListRunsResponse(
            runs=[
                budget_service_pb2.ListedRun(run=convert.run_pb(v), state=convert.state_pb(v.state))
                for v in views
                if v is not None
            ]
        )
        if len(ids) == size:
            response.next_page_token = page_token(ids[-1], query)
        return response

    @_unary
    async def Reserve(
        self,
        request: budget_service_pb2.ReserveRequest,
        context: Context,
    ) -> budget_service_pb2.ReserveResponse:
        try:
            return await self._decide(request)
        except _FailedOpen as opened:
            return opened.response

    async def _decide(
        self, request: budget_service_pb2.ReserveRequest
    ) -> budget_service_pb2.ReserveResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id)
        reservation_id = (
            check.identifier("reservation_id", request.reservation_id, required=False) or _new_id()
        )
        call: LlmCall | None = None
        amount = 0
        if request.HasField("llm_call"):
            call = check.llm_call("llm_call", request.llm_call)
        else:
            amount = check.micros(
                "amount_micros",
                request.amount_micros if request.HasField("amount_micros") else None,
                minimum=1,
            )
        ttl = check.duration_ms(
            "ttl",
            request.ttl if request.HasField("ttl") else None,
            max_ms=self.settings.max_ttl_ms,
        )
        meter = check.meter("meter", request.meter) if request.meter else ""
        units = 0
        if request.HasField("meter_units"):
            units = check.count("meter_units", request.meter_units)
            if not meter:
                check.fail("meter_units", "is only allowed with a meter")
        elif meter:
            units = 1
        check.done()
        extras = ReserveExtras(meter=meter, meter_units=units)
        if call is None:
            result = await self._reserve(run_id, reservation_id, amount, ttl, extras, None)
            return decisions.reserve_response(run_id, result)
        priced = self._estimate(call)
        result = await self._reserve(run_id, reservation_id, 0, ttl, extras, priced)
        if not decisions.short_of_money(result):
            return decisions.reserve_response(run_id, result, priced)
        # An LLM call that did not fit: find what could stand in for it.
        view = await self.backend.get_run(self.tenant, run_id)
        remaining = await self._remaining(view, result)
        found = alternatives.find(
            call,
            self._models(),
            remaining,
            allowed=frozenset(view.policy.downgrade_models),
            default_max_output=self.settings.default_max_output_tokens,
            max_output_cap=self.settings.max_output_tokens,
        )
        listed = found[: alternatives.MAX_LISTED]
        if view.policy.auto_downgrade:
            downgraded = await self._downgrade(
                call, reservation_id, run_id, ttl, extras, result, found
            )
            if downgraded is not None:
                chosen, held = downgraded
                return decisions.reserve_response(
                    run_id, held, chosen, listed, requested_model=call.model
                )
            # A block after all: the ledger left it uncounted while a downgrade could replace it.
            state = await self.backend.count_block(self.tenant, run_id, result.reservation_id)
            result = dataclasses.replace(result, state=state)
        return decisions.reserve_response(run_id, result, priced, listed)

    def _estimate(self, call: LlmCall) -> Estimate:
        price, version = self._price_of(call.provider, call.model)
        priced = estimate(
            price,
            version,
            call,
            default_max_output=self.settings.default_max_output_tokens,
            max_output_cap=self.settings.max_output_tokens,
        )
        if priced.amount_micros > MAX_MICROS:
            raise InvalidArgument(
                [FieldViolation("llm_call", f"its estimate passes {MAX_MICROS} micro-USD")]
            )
        return priced

    async def _reserve(
        self,
        run_id: str,
        reservation_id: str,
        amount: int,
        ttl: int | None,
        extras: ReserveExtras,
        priced: Estimate | None,
    ) -> ReserveResult:
        """One Reserve on the backend (an LLM call at its estimate), failing
        open when the deployment says so."""
        if priced is not None:
            amount = priced.amount_micros
            extras = dataclasses.replace(
                extras,
                fingerprint=priced.fingerprint,
                pricing=priced.pricing,
                preblock=None if priced.known else DecisionReason.UNKNOWN_PRICE,
                tokens=priced.call.input_tokens + priced.effective_max_output_tokens,
            )
        try:
            result = await self.backend.reserve(
                self.tenant, run_id, reservation_id, amount, ttl, extras
            )
        except errors.BackendUnavailable:
            if not self._fails_open(run_id):
                raise
            raise _FailedOpen(self._failed_open(run_id, reservation_id, priced)) from None
        self._remember_mode(run_id, result.mode)
        held = result.decision in decisions.HOLDING
        if extras.pricing and held and not result.replayed:
            self._remember_pricing((self.tenant, run_id, result.reservation_id), extras.pricing)
        return result

    async def _remaining(self, view: RunView, result: ReserveResult) -> int:
        """What the run and the scope that blocked have left (the smaller).

        A calibrated run checks an alternative's worst case (its estimate)
        against its exposure ceiling too: what that ceiling has left counts.
        A calibrated hold is at most the worst case, so an estimate within
        both fits either way.
        """
        state = view.state
        remaining = state.remaining_micros
        if state.exposure_ceiling_micros:
            room = max(0, state.exposure_ceiling_micros - state.exposure_micros)
            remaining = min(remaining, room)
        scope = result.blocking_scope
        if scope is None or scope == ScopeRef(ScopeKind.RUN, view.spec.run_id):
            return remaining
        if scope.kind is ScopeKind.RUN:
            ancestor = await self.backend.get_run(self.tenant, scope.id)
            return min(remaining, ancestor.state.remaining_micros)
        usage = (await self.backend.get_scope(self.tenant, scope)).period(
            result.blocking_period or Period.LIFETIME
        )
        return min(remaining, usage.remaining_micros)

    async def _downgrade(
        self,
        call: LlmCall,
        reservation_id: str,
        run_id: str,
        ttl: int | None,
        extras: ReserveExtras,
        blocked: ReserveResult,
        found: list[alternatives.Alternative],
    ) -> tuple[Estimate, ReserveResult] | None:
        """Hold the priciest alternative that fits, under the blocked
        reservation's downgrade id; None when nothing is held.

        A retry replays the downgrade made the first time, if any, whatever
        fits now: the same request gets the same answer.
        """
        downgrade_id = decisions.downgrade_id(reservation_id)
        if blocked.replayed:
            try:
                first = await self.backend.get_reservation(self.tenant, run_id, downgrade_id)
            except errors.ReservationNotFound:
                return None
            if not first.pricing:
                return None
            chosen = Pricing.decode(first.pricing)
            priced = self._estimate(call.on(chosen.provider, chosen.model))
        elif found:
            priced = found[-1].estimate
        else:
            return None
        # Its block, if any, is not counted: the blocked call it stands in for is.
        stand_in = dataclasses.replace(extras, downgrade=True)
        held = await self._reserve(run_id, downgrade_id, 0, ttl, stand_in, priced)
        return (priced, held) if held.decision in decisions.HOLDING else None

    @_unary
    async def Commit(
        self,
        request: budget_service_pb2.CommitRequest,
        context: Context,
    ) -> budget_service_pb2.CommitResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id)
        reservation_id = check.identifier("reservation_id", request.reservation_id)
        usage: TokenUsage | None = None
        actual = 0
        if request.HasField("usage"):
            usage = check.usage("usage", request.usage)
        else:
            actual = check.micros(
                "actual_micros",
                request.actual_micros if request.HasField("actual_micros") else None,
                minimum=0,
            )
        check.done()
        tokens = output = None
        if usage is not None:
            actual = await self._actual_of(run_id, reservation_id, usage)
            tokens = usage.total_tokens
            # What counts against max_output_tokens feeds a calibrated run's estimate.
            output = usage.output_tokens + usage.reasoning_tokens
        result = await self.backend.commit(
            self.tenant, run_id, reservation_id, actual, tokens, output
        )
        return budget_service_pb2.CommitResponse(
            state=convert.state_pb(result.state),
            overrun_micros=result.overrun_micros,
            replayed=result.replayed,
            reservation_status=result.reservation_status.value,  # type: ignore[arg-type]
            actual_micros=result.actual_micros,
            held_micros=result.held_micros,
        )

    def _remember_mode(self, run_id: str, mode: EnforcementMode) -> None:
        """Runs' modes (fixed at creation), for failing open without the backend."""
        if self.settings.fail_open != "advisory":
            return
        key = (self.tenant, run_id)
        self._modes[key] = mode

    def _fails_open(self, run_id: str) -> bool:
        policy = self.settings.fail_open
        return policy == "always" or (
            policy == "advisory"
            and self._modes.get((self.tenant, run_id)) is EnforcementMode.ADVISORY
        )

    def _failed_open(
        self, run_id: str, reservation_id: str, priced: Estimate | None
    ) -> budget_service_pb2.ReserveResponse:
        """The answer while the storage is down and the deployment fails open: a
        warning that holds and records nothing. Loud: logged and counted."""
        self.failed_open += 1
        log.warning(
            "storage unreachable: reserve %s/%s failed OPEN (RUNCAP_FAIL_OPEN=%s; %d so far)",
            run_id,
            reservation_id,
            self.settings.fail_open,
            self.failed_open,
        )
        response = budget_service_pb2.ReserveResponse(
            decision=budget_pb2.DECISION_WARN,
            reason=budget_pb2.DECISION_REASON_BACKEND_UNAVAILABLE,
            reservation_id=reservation_id,
            state=budget_pb2.BudgetState(run_id=run_id),
            enforcement_mode=self._modes.get(  # type: ignore[arg-type]
                (self.tenant, run_id), EnforcementMode.HARD_GATE
            ).value,
        )
        if priced is not None:
            response.estimate.CopyFrom(convert.estimate_pb(priced))
        return response

    def _remember_pricing(self, key: tuple[str, str, str], pricing: str) -> None:
        self._pricings[key] = pricing

    def _models(self) -> Iterator[tuple[ModelPrice, str]]:
        """Every priced model with its version: the tenant's prices, then the table's."""
        own = self.tenant_prices.models()
        yield from ((price, self.tenant_prices.label) for price in own)
        table = self.prices.table
        taken = {(p.provider, p.model) for p in own}
        for price in table.models():
            if (price.provider, price.model) not in taken:
                yield price, table.version

    def _price_of(self, provider: str, model: str) -> tuple[ModelPrice | None, str]:
        """The price Reserve uses: the tenant's own, else the table's; and its version."""
        own = self.tenant_prices.lookup(provider, model)
        if own is not None:
            return own, self.tenant_prices.label
        table = self.prices.table
        return table.lookup(provider, model), table.version

    @_unary
    async def SetModelPrice(
        self,
        request: budget_service_pb2.SetModelPriceRequest,
        context: Context,
    ) -> budget_service_pb2.SetModelPriceResponse:
        check = Validator()
        price = check.model_price("price", request.price)
        check.done()
        assert price is not None
        await self.tenant_prices.set(price)
        return budget_service_pb2.SetModelPriceResponse(price=convert.model_price_pb(price))

    @_unary
    async def DeleteModelPrice(
        self,
        request: budget_service_pb2.DeleteModelPriceRequest,
        context: Context,
    ) -> budget_service_pb2.DeleteModelPriceResponse:
        check = Validator()
        provider = check.model_name("provider", request.provider)
        model = check.model_name("model", request.model)
        check.done()
        deleted = await self.tenant_prices.delete(provider, model)
        return budget_service_pb2.DeleteModelPriceResponse(deleted=deleted)

    @_unary
    async def GetModelPrice(
        self,
        request: budget_service_pb2.GetModelPriceRequest,
        context: Context,
    ) -> budget_service_pb2.GetModelPriceResponse:
        check = Validator()
        provider = check.model_name("provider", request.provider)
        model = check.model_name("model", request.model)
        check.done()
        await self.tenant_prices.refresh()
        price, _ = self._price_of(provider, model)
        response = budget_service_pb2.GetModelPriceResponse(
            tenant_override=self.tenant_prices.lookup(provider, model) is not None,
            price_table_version=self.prices.table.version,
        )
        if price is not None:
            response.price.CopyFrom(convert.model_price_pb(price))
        return response

    @_unary
    async def Approve(
        self,
        request: budget_service_pb2.ApproveRequest,
        context: Context,
    ) -> budget_service_pb2.ApproveResponse:
        run_id, trigger, result = await self._resolve(request.approval_id, approve=True)
        return budget_service_pb2.ApproveResponse(
            approval=convert.approval_pb(run_id, trigger, result.status),
            state=convert.state_pb(result.state),
            replayed=result.replayed,
        )

    @_unary
    async def Deny(
        self,
        request: budget_service_pb2.DenyRequest,
        context: Context,
    ) -> budget_service_pb2.DenyResponse:
        run_id, trigger, result = await self._resolve(request.approval_id, approve=False)
        return budget_service_pb2.DenyResponse(
            approval=convert.approval_pb(run_id, trigger, result.status),
            state=convert.state_pb(result.state),
            replayed=result.replayed,
        )

    async def _resolve(self, text: str, *, approve: bool) -> tuple[str, str, ApprovalResult]:
        check = Validator()
        run_id, trigger = check.approval_id("approval_id", text)
        check.done()
        try:
            result = await self.backend.resolve_approval(self.tenant, run_id, trigger, approve)
        except errors.RunNotFound:
            raise errors.ApprovalNotFound(text) from None
        return run_id, trigger, result

    @_unary
    async def ReloadPriceTable(
        self,
        request: budget_service_pb2.ReloadPriceTableRequest,
        context: Context,
    ) -> budget_service_pb2.ReloadPriceTableResponse:
        # Reading and checking ~2,000 models takes a moment: off the event loop.
        reloaded, message = await asyncio.to_thread(self.prices.reload)
        table = self.prices.table
        return budget_service_pb2.ReloadPriceTableResponse(
            reloaded=reloaded,
            price_table_version=table.version,
            models=len(table),
            message=message,
        )

    @_unary
    async def GetDecision(
        self,
        request: budget_service_pb2.GetDecisionRequest,
        context: Context,
    ) -> budget_service_pb2.GetDecisionResponse:
        if not request.decision_id:
            raise InvalidArgument([FieldViolation("decision_id", "is required")])
        run_id, reservation_id = decisions.parse_decision_id(request.decision_id)
        try:
            reservation = await self.backend.get_reservation(self.tenant, run_id, reservation_id)
            view = await self.backend.get_run(self.tenant, run_id)
        except (errors.RunNotFound, errors.ReservationNotFound):
            raise errors.DecisionNotFound(request.decision_id) from None
        return decisions.record_pb(view, reservation)

    async def _actual_of(self, run_id: str, reservation_id: str, usage: TokenUsage) -> int:
        """Price `usage` at the rates the reservation was made with.

        A reservation made through this replica needs no read: its pricing is
        remembered here (it never changes), saving Commit a round trip.
        """
        known = self._pricings.get((self.tenant, run_id, reservation_id))
        if known is not None:
            return actual_micros(known, usage)
        reservation = await self.backend.get_reservation(self.tenant, run_id, reservation_id)
        if reservation.pricing:
            return actual_micros(reservation.pricing, usage)
        if reservation.status is ReservationStatus.BLOCKED:
            return 0  # the commit answers RESERVATION_BLOCKED
        raise InvalidArgument(
            [
                FieldViolation(
                    "usage",
                    f"reservation {reservation_id!r} was reserved with an amount, not an "
                    "llm_call, so there are no prices to apply: commit it with actual_micros",
                )
            ]
        )

    @_unary
    async def Refund(
        self,
        request: budget_service_pb2.RefundRequest,
        context: Context,
    ) -> budget_service_pb2.RefundResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id)
        reservation_id = check.identifier("reservation_id", request.reservation_id)
        check.done()
        result = await self.backend.refund(self.tenant, run_id, reservation_id)
        return budget_service_pb2.RefundResponse(
            state=convert.state_pb(result.state),
            replayed=result.replayed,
            reservation_status=result.reservation_status.value,  # type: ignore[arg-type]
            released_micros=result.released_micros,
        )

    @_unary
    async def CloseRun(
        self,
        request: budget_service_pb2.CloseRunRequest,
        context: Context,
    ) -> budget_service_pb2.CloseRunResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id)
        check.done()
        result = await self.backend.close_run(self.tenant, run_id)
        if self.open_runs is not None:
            await self.open_runs.release(self.tenant, run_id)
        return budget_service_pb2.CloseRunResponse(
            state=convert.state_pb(result.state), replayed=result.replayed
        )

    @_unary
    async def SuspendRun(
        self,
        request: budget_service_pb2.SuspendRunRequest,
        context: Context,
    ) -> budget_service_pb2.SuspendRunResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id)
        check.done()
        result = await self.backend.suspend_run(self.tenant, run_id)
        return budget_service_pb2.SuspendRunResponse(
            state=convert.state_pb(result.state), replayed=result.replayed
        )

    @_unary
    async def ResumeRun(
        self,
        request: budget_service_pb2.ResumeRunRequest,
        context: Context,
    ) -> budget_service_pb2.ResumeRunResponse:
        check = Validator()
        run_id = check.identifier("run_id", request.run_id)
        check.done()
        result = await self.backend.resume_run(self.tenant, run_id)
        return budget_service_pb2.ResumeRunResponse(
            state=convert.state_pb(result.state), replayed=result.replayed
        )

    @_unary
    async def SetScopeLimit(
        self,
        request: budget_service_pb2.SetScopeLimitRequest,
        context: Context,
    ) -> budget_service_pb2.SetScopeLimitResponse:
        check = Validator()
        ref = check.scope("scope", request.scope.kind, request.scope.id)
        period = check.period("period", request.period)
        limit: int | None = None
        ceiling = request.WhichOneof("ceiling")
        if ceiling == "limit_micros":
            limit = check.micros("limit_micros", request.limit_micros, minimum=1)
        elif ceiling != "clear" or not request.clear:
            check.fail("limit_micros", "is required (or set clear to remove the ceiling)")
        check.done()
        view = await self.backend.set_scope_limit(self.tenant, ref, period, limit)
        return budget_service_pb2.SetScopeLimitResponse(scope=convert.scope_pb(view))

    @_unary
    async def SetScopePolicy(
        self,
        request: budget_service_pb2.SetScopePolicyRequest,
        context: Context,
    ) -> budget_service_pb2.SetScopePolicyResponse:
        check = Validator()
        ref = check.scope("scope", request.scope.kind, request.scope.id)
        policy: RunPolicy | None = None
        which = request.WhichOneof("default")
        if which == "policy":
            policy = check.policy("policy", request.policy)
        elif which != "clear" or not request.clear:
            check.fail("policy", "is required (or set clear to remove the default)")
        check.done()
        view = await self.backend.set_scope_policy(self.tenant, ref, policy)
        return budget_service_pb2.SetScopePolicyResponse(scope=convert.scope_pb(view))

    @_unary
    async def GetScope(
        self,
        request: budget_service_pb2.GetScopeRequest,
        context: Context,
    ) -> budget_service_pb2.GetScopeResponse:
        check = Validator()
        ref = check.scope("scope", request.scope.kind, request.scope.id)
        check.done()
        view = await self.backend.get_scope(self.tenant, ref)
        return budget_service_pb2.GetScopeResponse(scope=convert.scope_pb(view))

    async def Watch(  # type: ignore[override]  # events are bytes: see add_to_server
        self,
        request: budget_service_pb2.WatchRequest,
        context: Context,
    ) -> AsyncGenerator[budget_service_pb2.WatchResponse | bytes, None]:
        try:
            await self._enter("Watch", request, context)
            check = Validator()
            run_id = check.identifier("run_id", request.run_id)
            after: int | None = None
            if request.HasField("after_revision"):
                after = request.after_revision
                if after < 0:
                    check.fail("after_revision", f"must not be negative (got {after})")
            check.done()
            items = self.hub.stream(self.tenant, run_id, after, request.after_digest)
            async with contextlib.aclosing(items):
                async for item in items:
                    yield self._encoded(item) if isinstance(item, Change) else _watch_response(item)
        except Exception as error:
            await _abort(context, error)


class _Registrar:
    """Stands in for the server while the generated code lists the service's handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_to_server(servicer: BudgetServicer, server: grpc.aio.Server) -> None:
    """Register the service, with a Watch that sends pre-serialized events as they are.

    The generated registration would serialize every message once per stream.
    """

    def pass_bytes(handlers: dict[str, Any]) -> None:
        handlers["Watch"] = handlers["Watch"]._replace(response_serializer=_serialize_watch)

    register(
        budget_service_pb2_grpc.add_BudgetServiceServicer_to_server, servicer, server, pass_bytes
    )


def register(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    adjust: Callable[[dict[str, Any]], None] = lambda handlers: None,
) -> None:
    """Register a service through its generated `add_..._to_server`, each handler
    made tolerant of a request that does not parse (INVALID_ARGUMENT with the usual
    details, like any malformed request, instead of gRPC's own UNKNOWN).

    Done once here rather than by an interceptor: without interceptors grpc.aio
    takes its direct path, with nothing to await per call before the handler.
    """
    registrar = _Registrar()
    add(servicer, registrar)
    handlers = {name: _tolerant(handler) for name, handler in registrar.handlers.items()}
    adjust(handlers)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(registrar.service, handlers),)
    )
    # (grpc-stubs lag grpcio here)
    server.add_registered_method_handlers(  # type: ignore[attr-defined]
        registrar.service, handlers
    )


def _serialize_watch(message: budget_service_pb2.WatchResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _watch_response(item: WatchItem) -> budget_service_pb2.WatchResponse:
    if isinstance(item, Snapshot):
        return budget_service_pb2.WatchResponse(
            revision=item.state.revision, snapshot=convert.state_pb(item.state)
        )
    if isinstance(item, Progress):
        return budget_service_pb2.WatchResponse(
            revision=item.revision, progress=budget_service_pb2.Progress(final=item.final)
        )
    assert isinstance(item, Change)
    return budget_service_pb2.WatchResponse(revision=item.revision, event=convert.event_pb(item))


def _run_id(request: Any) -> str:
    return str(request.run_id)


def _run_of_id(request: Any) -> str:
    """The run of a decision or approval id ("run/...")."""
    field = "decision_id" if hasattr(request, "decision_id") else "approval_id"
    return str(getattr(request, field)).partition("/")[0]


def _parent_run(request: Any) -> str:
    return str(request.parent_run_id)


_Access = tuple[auth.Role, Callable[[Any], str] | None]
# What each RPC needs: the least role, and for an agent the run it must own.
_ACCESS: dict[str, _Access] = {
    "CreateRun": (auth.Role.AGENT, _parent_run),
    "GetRun": (auth.Role.AGENT, _run_id),
    "Reserve": (auth.Role.AGENT, _run_id),
    "Commit": (auth.Role.AGENT, _run_id),
    "Refund": (auth.Role.AGENT, _run_id),
    "CloseRun": (auth.Role.AGENT, _run_id),
    "Watch": (auth.Role.AGENT, _run_id),
    "GetDecision": (auth.Role.AGENT, _run_of_id),
    "GetModelPrice": (auth.Role.AGENT, None),
    "SuspendRun": (auth.Role.OPERATOR, None),
    "ResumeRun": (auth.Role.OPERATOR, None),
    "Approve": (auth.Role.OPERATOR, None),
    "Deny": (auth.Role.OPERATOR, None),
    "GetScope": (auth.Role.OPERATOR, None),
    "ListRuns": (auth.Role.OPERATOR, None),
    "SetScopeLimit": (auth.Role.ADMIN, None),
    "SetScopePolicy": (auth.Role.ADMIN, None),
    "SetModelPrice": (auth.Role.ADMIN, None),
    "DeleteModelPrice": (auth.Role.ADMIN, None),
    "ReloadPriceTable": (auth.Role.ADMIN, None),
}
