package runcap

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

// ErrBudgetBlocked matches (with errors.Is) every *BudgetBlockedError.
var ErrBudgetBlocked = errors.New("runcap: budget blocked")

// ErrUnknownPrice matches (with errors.Is) a *BudgetBlockedError whose
// reason is DECISION_REASON_UNKNOWN_PRICE: the server has no price for the
// LLM call's provider and model, so it failed closed.
var ErrUnknownPrice = errors.New("runcap: unknown price")

// ErrBudgetThrottled matches (with errors.Is) a *BudgetThrottledError: the
// server answered DECISION_THROTTLE, so nothing is held; reserve again, with
// a new reservation id, after its RetryAfter. Such an error matches
// ErrBudgetBlocked too.
var ErrBudgetThrottled = errors.New("runcap: budget throttled")

// ErrApprovalRequired matches (with errors.Is) an *ApprovalRequiredError: the
// server answered DECISION_APPROVAL_REQUIRED, so nothing is held; reserve
// again, with a new reservation id, once its ApprovalID is approved. Such an
// error matches ErrBudgetBlocked too.
var ErrApprovalRequired = errors.New("runcap: approval required")

// BudgetBlockedError is returned by Hold and WithReservation when the server
// blocks the reservation. It is not a *runcaperr.Error: the call succeeded
// and the answer was no. Nothing is held. A throttle is a
// *BudgetThrottledError, and a call that needs approval first an
// *ApprovalRequiredError; errors.As also finds either as a
// *BudgetBlockedError.
type BudgetBlockedError struct {
	// RunID is the run the reservation was for.
	RunID string
	// Response is the ReserveResponse with the block decision, its reason
	// and the run's budget state.
	Response *runcapv1.ReserveResponse
}

func (e *BudgetBlockedError) Error() string {
	r := e.Response
	msg := fmt.Sprintf("runcap: reservation %q of run %q was blocked (%s): ", r.GetReservationId(), e.RunID, r.GetReason())
	est := r.GetEstimate()
	if e.UnknownPrice() {
		model := "the model"
		if est != nil {
			model = fmt.Sprintf("model %q of provider %q", est.GetModel(), est.GetProvider())
			if v := est.GetPriceTableVersion(); v != "" {
				model += fmt.Sprintf(" (price table %q)", v)
			}
		}
		return msg + "unknown price: the server has no price for " + model + ", so runcap fails closed; nothing is held"
	}
	if e.ApprovalDenied() {
		which := "its approval"
		if id := e.ApprovalID(); id != "" {
			which = fmt.Sprintf("approval %q", id)
		}
		return msg + "the call needs " + which + ", which was denied; nothing is held"
	}
	switch e.Dimension() {
	case runcapv1.BudgetDimension_BUDGET_DIMENSION_METER:
		which := "the call meter"
		if m := e.Meter(); m != "" {
			which = fmt.Sprintf("meter %q", m)
		}
		return msg + which + " of the run is at its ceiling"
	case runcapv1.BudgetDimension_BUDGET_DIMENSION_TOKENS:
		st := r.GetState()
		msg += fmt.Sprintf("the call does not fit the run's token ceiling (%d tokens committed, %d held)",
			st.GetCommittedTokens(), st.GetReservedTokens())
		if est != nil {
			msg += fmt.Sprintf("; the %s/%s call was estimated at %d tokens",
				est.GetProvider(), est.GetModel(), est.GetInputTokens()+est.GetEffectiveMaxOutputTokens())
		}
		return msg
	}
	msg += fmt.Sprintf("%d of %d micros remain", r.GetState().GetRemainingMicros(), r.GetState().GetLimitMicros())
	if est != nil {
		msg += fmt.Sprintf(", the %s/%s call was estimated at %d micros", est.GetProvider(), est.GetModel(), est.GetAmountMicros())
	}
	if s := r.GetBlockingScope(); s != nil && (s.GetKind() != runcapv1.ScopeKind_SCOPE_KIND_RUN || s.GetId() != e.RunID) {
		msg += fmt.Sprintf(" (blocked by %s %q", s.GetKind(), s.GetId())
		if p := r.GetBlockingPeriod(); p != runcapv1.Period_PERIOD_UNSPECIFIED {
			msg += ", " + p.String()
		}
		msg += ")"
	}
	if alts := r.GetAlternatives(); len(alts) > 0 {
		msg += fmt.Sprintf("; %d alternative model(s) fit, the cheapest %s/%s at %d micros",
			len(alts), alts[0].GetProvider(), alts[0].GetModel(), alts[0].GetAmountMicros())
	}
	return msg
}

// Is makes errors.Is(err, ErrBudgetBlocked) true, and errors.Is(err,
// ErrUnknownPrice) true for a block by an unknown price.
func (e *BudgetBlockedError) Is(target error) bool {
	return target == ErrBudgetBlocked || (target == ErrUnknownPrice && e.UnknownPrice())
}

// UnknownPrice reports whether the block is DECISION_REASON_UNKNOWN_PRICE:
// the server has no price for the LLM call's provider and model (a typo, an
// alias, or a model newer than its price table), not a budget ceiling.
func (e *BudgetBlockedError) UnknownPrice() bool {
	return e.Response.GetReason() == runcapv1.DecisionReason_DECISION_REASON_UNKNOWN_PRICE
}

// Estimate is how the server priced the LLM call (provider, model, tokens,
// amount and price table version), or nil for a reservation of an amount.
func (e *BudgetBlockedError) Estimate() *runcapv1.LlmEstimate { return e.Response.GetEstimate() }

// Reason says why the reservation was blocked.
func (e *BudgetBlockedError) Reason() runcapv1.DecisionReason { return e.Response.GetReason() }

// State is the run's budget state at the decision.
func (e *BudgetBlockedError) State() *runcapv1.BudgetState { return e.Response.GetState() }

// BlockingScope is the scope whose ceiling (or closed ancestor run) blocked:
// the run itself, an ancestor run, or the run's API key, user or team. Nil
// when the server did not say.
func (e *BudgetBlockedError) BlockingScope() *runcapv1.ScopeRef { return e.Response.GetBlockingScope() }

// BlockingPeriod is the period of the ceiling that blocked (PERIOD_LIFETIME
// for runs), or PERIOD_UNSPECIFIED when the server did not say.
func (e *BudgetBlockedError) BlockingPeriod() runcapv1.Period { return e.Response.GetBlockingPeriod() }

// Dimension is the limit that blocked: spend, the run's token ceiling, a
// call meter (see Meter), its rate limit or its in-flight cap;
// BUDGET_DIMENSION_UNSPECIFIED for a block by the run's lifecycle (closed,
// suspended) or when the server did not say.
func (e *BudgetBlockedError) Dimension() runcapv1.BudgetDimension {
	return e.Response.GetBlockingDimension()
}

// Meter is the call meter at its ceiling, for a block on
// BUDGET_DIMENSION_METER; empty otherwise.
func (e *BudgetBlockedError) Meter() string { return e.Response.GetBlockingMeter() }

// EnforcementMode is the run's enforcement mode, which shaped the decision
// (ENFORCEMENT_MODE_UNSPECIFIED when the server did not say).
func (e *BudgetBlockedError) EnforcementMode() runcapv1.EnforcementMode {
	return e.Response.GetEnforcementMode()
}

// DecisionID is the decision's id, for GetDecision (the decision with the
// inputs it was made from); empty when the server did not say.
func (e *BudgetBlockedError) DecisionID() string { return e.Response.GetDecisionId() }

// Alternatives are, for an LLM call blocked by money, the models that could
// stand in for it (provider, model, the call's estimate on it and the output
// tokens that prices): each has every capability the call needs (see
// LLMCall) and fits what the blocking scope has left. Cheapest first, at
// most 5; empty when none fits or for an amount.
func (e *BudgetBlockedError) Alternatives() []*runcapv1.Alternative {
	return e.Response.GetAlternatives()
}

// ApprovalID is the escalation the decision is about: for a block by a
// denied approval (DECISION_REASON_APPROVAL_DENIED) the one that was denied,
// for an *ApprovalRequiredError the one to approve; empty otherwise.
func (e *BudgetBlockedError) ApprovalID() string { return e.Response.GetApprovalId() }

// ApprovalDenied reports whether the block is DECISION_REASON_APPROVAL_DENIED:
// the call trips one of the run's escalation triggers, and its approval
// (ApprovalID) was denied.
func (e *BudgetBlockedError) ApprovalDenied() bool {
	return e.Response.GetReason() == runcapv1.DecisionReason_DECISION_REASON_APPROVAL_DENIED
}

// BudgetThrottledError is returned by Hold and WithReservation when the
// server answers DECISION_THROTTLE: not now. Nothing is held. The run is in
// its throttle band (DECISION_REASON_THROTTLED), over its rate limit
// (DECISION_REASON_RATE_LIMITED) or at its cap of holds in flight
// (DECISION_REASON_IN_FLIGHT_LIMIT); Dimension says which limit.
//
// Wait RetryAfter, then reserve again with a new reservation id: the
// throttled id is spent like a blocked one (a retry of it only replays this
// answer). Without the ReservationID option each call makes a fresh id:
//
//	for {
//		err := client.WithReservation(ctx, runID, 50_000, fn)
//		var throttled *runcap.BudgetThrottledError
//		if !errors.As(err, &throttled) {
//			return err
//		}
//		time.Sleep(throttled.RetryAfter())
//	}
//
// It matches ErrBudgetThrottled and ErrBudgetBlocked with errors.Is, and
// errors.As finds it as a *BudgetBlockedError too, so code that treats every
// refusal alike keeps working.
type BudgetThrottledError struct {
	BudgetBlockedError
}

// RetryAfter is how long to wait before reserving again (zero when the
// server gave no delay, or for a replay whose delay has passed).
func (e *BudgetThrottledError) RetryAfter() time.Duration {
	return e.Response.GetRetryAfter().AsDuration()
}

func (e *BudgetThrottledError) Error() string {
	r := e.Response
	msg := fmt.Sprintf("runcap: reservation %q of run %q was throttled (%s): ", r.GetReservationId(), e.RunID, r.GetReason())
	switch r.GetReason() {
	case runcapv1.DecisionReason_DECISION_REASON_THROTTLED:
		msg += "the run's committed spend is in its throttle band; "
	case runcapv1.DecisionReason_DECISION_REASON_RATE_LIMITED:
		msg += "the run's rate limit is used up for this window; "
	case runcapv1.DecisionReason_DECISION_REASON_IN_FLIGHT_LIMIT:
		msg += "the run has its maximum of holds in flight; "
	}
	return msg + fmt.Sprintf("reserve again with a new reservation id after %v; nothing is held", e.RetryAfter())
}

// Is makes errors.Is(err, ErrBudgetThrottled) and errors.Is(err,
// ErrBudgetBlocked) true.
func (e *BudgetThrottledError) Is(target error) bool {
	return target == ErrBudgetThrottled || e.BudgetBlockedError.Is(target)
}

// As lets errors.As find the error as a *BudgetBlockedError.
func (e *BudgetThrottledError) As(target any) bool {
	if t, ok := target.(**BudgetBlockedError); ok {
		*t = &e.BudgetBlockedError
		return true
	}
	return false
}

// ApprovalRequiredError is returned by Hold and WithReservation when the
// server answers DECISION_APPROVAL_REQUIRED: the call needs approval first.
// Nothing is held. The call trips one of the run's escalation triggers: its
// committed and held spend with this estimate would pass the policy's
// ApprovalPercent of its limit (DECISION_REASON_SPEND_NEEDS_APPROVAL), or
// its meter is not on the policy's ApprovedMeters
// (DECISION_REASON_METER_NEEDS_APPROVAL; Meter names it).
//
// A person or a supervising agent resolves ApprovalID with Client.Approve or
// Client.Deny (Watch shows the request and its outcome). Once it is
// approved, reserve again with a new reservation id (the one answered is
// spent, like a blocked one); once it is denied, such calls are blocked
// (DECISION_REASON_APPROVAL_DENIED):
//
//	err := client.WithReservation(ctx, runID, 50_000, fn, runcap.Meter("tool:deploy"))
//	var pending *runcap.ApprovalRequiredError
//	if errors.As(err, &pending) {
//		askAHuman(pending.ApprovalID()) // who calls client.Approve(ctx, id)
//	}
//
// It matches ErrApprovalRequired and ErrBudgetBlocked with errors.Is, and
// errors.As finds it as a *BudgetBlockedError too, so code that treats every
// refusal alike keeps working.
type ApprovalRequiredError struct {
	BudgetBlockedError
}

func (e *ApprovalRequiredError) Error() string {
	r := e.Response
	msg := fmt.Sprintf("runcap: reservation %q of run %q needs approval (%s): ", r.GetReservationId(), e.RunID, r.GetReason())
	switch r.GetReason() {
	case runcapv1.DecisionReason_DECISION_REASON_METER_NEEDS_APPROVAL:
		which := "the call's meter"
		if m := e.Meter(); m != "" {
			which = fmt.Sprintf("meter %q", m)
		}
		msg += which + " is not on the run's approved meters; "
	case runcapv1.DecisionReason_DECISION_REASON_SPEND_NEEDS_APPROVAL:
		msg += "the run's spend with this call would pass its approval threshold; "
	}
	return msg + fmt.Sprintf("approve %q, then reserve again with a new reservation id; nothing is held", e.ApprovalID())
}

// Is makes errors.Is(err, ErrApprovalRequired) and errors.Is(err,
// ErrBudgetBlocked) true.
func (e *ApprovalRequiredError) Is(target error) bool {
	return target == ErrApprovalRequired || e.BudgetBlockedError.Is(target)
}

// As lets errors.As find the error as a *BudgetBlockedError.
func (e *ApprovalRequiredError) As(target any) bool {
	if t, ok := target.(**BudgetBlockedError); ok {
		*t = &e.BudgetBlockedError
		return true
	}
	return false
}

// blockedError is the error of a reservation that is not held: a
// *BudgetThrottledError for a throttle, an *ApprovalRequiredError for an
// escalation, else a *BudgetBlockedError.
func blockedError(runID string, resp *runcapv1.ReserveResponse) error {
	blocked := BudgetBlockedError{RunID: runID, Response: resp}
	switch resp.GetDecision() {
	case runcapv1.Decision_DECISION_THROTTLE:
		return &BudgetThrottledError{BudgetBlockedError: blocked}
	case runcapv1.Decision_DECISION_APPROVAL_REQUIRED:
		return &ApprovalRequiredError{BudgetBlockedError: blocked}
	}
	return &blocked
}

// Hold is an allowed reservation: an amount held against a run until it is
// committed or refunded (or expires at its ttl). Commit and Refund retry
// safely: the reservation id makes them idempotent. A Hold is safe for
// concurrent use.
//
// A downgrade (DECISION_DOWNGRADE, from a run whose policy has
// AutoDowngrade) is held like an allow, against a cheaper model than the
// one asked for: Downgraded reports it, and Provider and Model name the
// model to call (RequestedModel the one asked for).
type Hold struct {
	client *Client
	// RunID is the run the amount is held against.
	RunID string
	// ReservationID is the reservation's id, as the server answered it (a
	// downgrade may be held under an id other than the one asked for):
	// Commit and Refund settle it.
	ReservationID string
	// Response is the ReserveResponse (an allow, a warning or a downgrade:
	// see Warning and Downgraded).
	Response *runcapv1.ReserveResponse

	llm *runcapv1.LlmCall // the LLM call asked for, or nil for an amount

	mu             sync.Mutex
	actual         *int64
	usage          *TokenUsage
	release        bool
	commitResponse *runcapv1.CommitResponse
	refundResponse *runcapv1.RefundResponse
}

// Hold reserves amountMicros against the run and returns the hold. When the
// server blocks the reservation it returns a *BudgetBlockedError (matching
// ErrBudgetBlocked), when it throttles it a *BudgetThrottledError
// (matching ErrBudgetThrottled; reserve again after its RetryAfter), and
// when the call needs approval first an *ApprovalRequiredError (matching
// ErrApprovalRequired; reserve again once its ApprovalID is approved); other
// failures are *runcaperr.Error. A warning of an advisory run is held like
// an allow: see Hold.Warning. The reservation id
// is generated on the client unless given, so the Reserve is retried safely.
// Settle the hold with Commit or Refund; see WithReservation for a helper
// that always settles.
func (c *Client) Hold(ctx context.Context, runID string, amountMicros int64, opts ...ReserveOption) (*Hold, error) {
	return c.hold(ctx, reserveRequest(runID, amountMicros, opts))
}

// HoldLLM reserves the server's price of an LLM call against the run and
// returns the hold, as Hold does for an amount; Hold.Estimate says how it
// was priced. A model the server has no price for is a *BudgetBlockedError
// matching ErrUnknownPrice, and a block by money lists the Alternatives that
// would fit. A run with AutoDowngrade answers DECISION_DOWNGRADE instead: the
// hold is of a cheaper model (Hold.Downgraded; call Hold.Model). Settle the
// hold with CommitUsage (or Commit, or Refund).
func (c *Client) HoldLLM(ctx context.Context, runID string, llm LLMCall, opts ...ReserveOption) (*Hold, error) {
	return c.hold(ctx, reserveLLMRequest(runID, llm, opts))
}

func (c *Client) hold(ctx context.Context, req *runcapv1.ReserveRequest) (*Hold, error) {
	runID := req.GetRunId()
	resp, err := call(ctx, c, true, c.stub.Reserve, req)
	if err != nil {
		return nil, err
	}
	switch resp.GetDecision() {
	case runcapv1.Decision_DECISION_ALLOW, runcapv1.Decision_DECISION_WARN, runcapv1.Decision_DECISION_DOWNGRADE:
		// Settle what the server holds: a downgrade's id may not be the one asked for.
		id := resp.GetReservationId()
		if id == "" {
			id = req.GetReservationId()
		}
		return &Hold{client: c, RunID: runID, ReservationID: id, Response: resp, llm: req.GetLlmCall()}, nil
	}
	// A block, a throttle, or a decision this client does not know: nothing
	// to go on with.
	return nil, blockedError(runID, resp)
}

// AmountMicros is the amount held.
func (h *Hold) AmountMicros() int64 { return h.Response.GetAmountMicros() }

// Warning reports whether the server answered DECISION_WARN: the run is in
// advisory mode and a blocking run would have blocked or throttled this
// call (see Reason and Dimension). The amount is held all the same.
func (h *Hold) Warning() bool {
	return h.Response.GetDecision() == runcapv1.Decision_DECISION_WARN
}

// FailedOpen reports whether the server failed open: an advisory run's
// Reserve answered DECISION_WARN with DECISION_REASON_BACKEND_UNAVAILABLE
// while the ledger's storage was unreachable. Nothing was held or recorded:
// the call may go ahead, but there is nothing to commit or refund
// (WithReservation settles nothing, and Commit fails with
// RESERVATION_NOT_FOUND).
func (h *Hold) FailedOpen() bool {
	return h.Warning() && h.Response.GetReason() == runcapv1.DecisionReason_DECISION_REASON_BACKEND_UNAVAILABLE
}

// Downgraded reports whether the server answered DECISION_DOWNGRADE: the
// LLM call asked for did not fit, the run's policy allows automatic
// downgrades, and the estimate of a cheaper model that has every capability
// the call needs is held instead. Call Model (of Provider), not the model
// asked for (RequestedModel).
func (h *Hold) Downgraded() bool {
	return h.Response.GetDecision() == runcapv1.Decision_DECISION_DOWNGRADE
}

// Model is the model to call: the one the server priced and held
// (Estimate().Model; for a downgrade, the cheaper stand-in), or the model of
// the LLM call asked for when the server gave no estimate (it failed open);
// empty for a hold of an amount.
func (h *Hold) Model() string {
	if m := h.Response.GetEstimate().GetModel(); m != "" {
		return m
	}
	return h.llm.GetModel()
}

// Provider is the provider of Model: Estimate().Provider (a downgrade may
// pick another provider's model), or that of the LLM call asked for when the
// server gave no estimate; empty for a hold of an amount.
func (h *Hold) Provider() string {
	if p := h.Response.GetEstimate().GetProvider(); p != "" {
		return p
	}
	return h.llm.GetProvider()
}

// RequestedModel is the model the LLM call asked for (for a downgrade, the
// response's RequestedModel); empty for a hold of an amount.
func (h *Hold) RequestedModel() string {
	if m := h.Response.GetRequestedModel(); m != "" {
		return m
	}
	return h.llm.GetModel()
}

// DecisionID is the decision's id, for GetDecision (the decision with the
// inputs it was made from); empty when the server did not say (a warning
// that failed open records nothing).
func (h *Hold) DecisionID() string { return h.Response.GetDecisionId() }

// Alternatives are, for a downgrade, the models that could stand in for the
// LLM call, cheapest first; empty otherwise.
func (h *Hold) Alternatives() []*runcapv1.Alternative { return h.Response.GetAlternatives() }

// Reason is why the server decided as it did: DECISION_REASON_WITHIN_BUDGET
// for a plain allow; for a warning, what a blocking run would have refused
// the call for.
func (h *Hold) Reason() runcapv1.DecisionReason { return h.Response.GetReason() }

// Dimension is, for a warning, the limit it is about (spend, tokens, a
// meter, the rate limit or the in-flight cap); BUDGET_DIMENSION_UNSPECIFIED
// for a plain allow.
func (h *Hold) Dimension() runcapv1.BudgetDimension { return h.Response.GetBlockingDimension() }

// Estimate is how the server priced the LLM call of a HoldLLM (tokens,
// amount, price table version), or nil for a hold of an amount.
func (h *Hold) Estimate() *runcapv1.LlmEstimate { return h.Response.GetEstimate() }

// State is the run's latest known budget state: after the commit or refund
// once the hold settled, after the reserve before.
func (h *Hold) State() *runcapv1.BudgetState {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.commitResponse != nil:
		return h.commitResponse.GetState()
	case h.refundResponse != nil:
		return h.refundResponse.GetState()
	}
	return h.Response.GetState()
}

// CommitResponse is the response of the commit that settled the hold, or nil.
func (h *Hold) CommitResponse() *runcapv1.CommitResponse {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.commitResponse
}

// RefundResponse is the response of the refund that settled the hold, or nil.
func (h *Hold) RefundResponse() *runcapv1.RefundResponse {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.refundResponse
}

// Commit records the actual cost (zero or more) and releases the rest of the
// hold.
func (h *Hold) Commit(ctx context.Context, actualMicros int64) (*runcapv1.CommitResponse, error) {
	resp, err := h.client.Commit(ctx, h.RunID, h.ReservationID, actualMicros)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.commitResponse = resp
	h.mu.Unlock()
	return resp, nil
}

// CommitUsage records the LLM call's actual token usage, priced by the
// server at the rates of the reservation (made with HoldLLM), and releases
// the rest of the hold.
func (h *Hold) CommitUsage(ctx context.Context, usage TokenUsage) (*runcapv1.CommitResponse, error) {
	resp, err := h.client.CommitUsage(ctx, h.RunID, h.ReservationID, usage)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.commitResponse = resp
	h.mu.Unlock()
	return resp, nil
}

// Refund releases the whole hold (the call did not happen or cost nothing).
func (h *Hold) Refund(ctx context.Context) (*runcapv1.RefundResponse, error) {
	resp, err := h.client.Refund(ctx, h.RunID, h.ReservationID)
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	h.refundResponse = resp
	h.mu.Unlock()
	return resp, nil
}

// SetActual makes WithReservation commit actualMicros (zero or more) when
// the func returns, even when it returns an error or panics (the money was
// spent). It replaces a SetUsage.
func (h *Hold) SetActual(actualMicros int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.actual = &actualMicros
	h.usage = nil
	h.release = false
}

// SetUsage makes WithLLMReservation commit the LLM call's actual token
// usage when the func returns, even when it returns an error or panics (the
// money was spent); the server prices it at the reservation's rates. Only
// for a hold of an LLM call: the server rejects usage for an amount. It
// replaces a SetActual.
func (h *Hold) SetUsage(usage TokenUsage) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.usage = &usage
	h.actual = nil
	h.release = false
}

// Release makes WithReservation refund the whole hold when the func returns
// (the call did not happen).
func (h *Hold) Release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.actual = nil
	h.usage = nil
	h.release = true
}

// ActualMicros is the cost given to SetActual, and whether it was called.
func (h *Hold) ActualMicros() (int64, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.actual == nil {
		return 0, false
	}
	return *h.actual, true
}

// Usage is the token usage given to SetUsage, and whether it was called.
func (h *Hold) Usage() (TokenUsage, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.usage == nil {
		return TokenUsage{}, false
	}
	return *h.usage, true
}

// outcome decides how WithReservation settles: commit (with the amount or,
// when usage is not nil, the token usage) or refund.
func (h *Hold) outcome(failed bool) (commit bool, actual int64, usage *TokenUsage) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.usage != nil:
		u := *h.usage
		return true, 0, &u
	case h.actual != nil:
		return true, *h.actual, nil
	case failed || h.release:
		return false, 0, nil
	}
	return true, h.Response.GetAmountMicros(), nil
}

// WithReservation holds amountMicros for the duration of fn and always
// settles the hold when fn returns:
//
//   - fn returns nil: the hold is committed with the amount given to
//     SetActual (or the token usage given to SetUsage), or with the whole
//     held amount when neither was called; after Release it is refunded
//     instead;
//   - fn returns an error or panics: the hold is refunded, unless SetActual
//     or SetUsage was called, in which case that cost is committed (the
//     money was spent). The error is returned (the panic re-raised); when settling
//     fails too, the returned error wraps both, and the hold expires at its
//     ttl.
//
// Settling uses a context that is not cancelled with ctx, so a cancelled
// call still gets refunded. A block returns a *BudgetBlockedError, a
// throttle a *BudgetThrottledError, an escalation an
// *ApprovalRequiredError, and fn is not called; a warning of an
// advisory run calls fn like an allow (Hold.Warning tells), and a warning
// that failed open (Hold.FailedOpen) is not settled, as nothing was held. A
// downgrade of an LLM call calls fn like an allow too (Hold.Downgraded
// tells; call Hold.Model) and is settled under Hold.ReservationID, the id
// the server answered with.
func (c *Client) WithReservation(ctx context.Context, runID string, amountMicros int64,
	fn func(ctx context.Context, h *Hold) error, opts ...ReserveOption,
) error {
	return c.withHold(ctx, reserveRequest(runID, amountMicros, opts), fn)
}

// WithLLMReservation holds the server's price of an LLM call for the
// duration of fn and always settles the hold when fn returns, as
// WithReservation does; call SetUsage with the call's actual token usage
// (or SetActual with its cost). A model the server has no price for
// returns a *BudgetBlockedError matching ErrUnknownPrice, and fn is not
// called.
//
//	llm := runcap.LLMCall{Provider: "openai", Model: "gpt-4o", InputTokens: 1200, MaxOutputTokens: 500}
//	err := client.WithLLMReservation(ctx, runID, llm, func(ctx context.Context, h *runcap.Hold) error {
//		reply, err := callTheModel(ctx)
//		if err != nil {
//			return err // refunded
//		}
//		h.SetUsage(runcap.TokenUsage{InputTokens: reply.InputTokens, OutputTokens: reply.OutputTokens})
//		return nil
//	})
func (c *Client) WithLLMReservation(ctx context.Context, runID string, llm LLMCall,
	fn func(ctx context.Context, h *Hold) error, opts ...ReserveOption,
) error {
	return c.withHold(ctx, reserveLLMRequest(runID, llm, opts), fn)
}

func (c *Client) withHold(ctx context.Context, req *runcapv1.ReserveRequest,
	fn func(ctx context.Context, h *Hold) error,
) error {
	h, err := c.hold(ctx, req)
	if err != nil {
		return err
	}
	settled := false
	defer func() {
		if settled {
			return
		}
		// fn panicked: settle as for an error, then let the panic go on.
		_ = h.settle(ctx, true)
	}()
	fnErr := fn(ctx, h)
	settled = true
	settleErr := h.settle(ctx, fnErr != nil)
	switch {
	case fnErr == nil:
		return settleErr
	case settleErr == nil:
		return fnErr
	}
	return fmt.Errorf("%w (runcap: settling reservation %q of run %q failed: %w; the hold expires at its ttl)",
		fnErr, h.ReservationID, h.RunID, settleErr)
}

func (h *Hold) settle(ctx context.Context, failed bool) error {
	if h.FailedOpen() {
		return nil // nothing was held
	}
	ctx = context.WithoutCancel(ctx)
	commit, actual, usage := h.outcome(failed)
	switch {
	case commit && usage != nil:
		_, err := h.CommitUsage(ctx, *usage)
		return err
	case commit:
		_, err := h.Commit(ctx, actual)
		return err
	}
	_, err := h.Refund(ctx)
	return err
}
