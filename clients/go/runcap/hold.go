package runcap

import (
	"context"
	"errors"
	"fmt"
	"sync"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

// ErrBudgetBlocked matches (with errors.Is) every *BudgetBlockedError.
var ErrBudgetBlocked = errors.New("runcap: budget blocked")

// BudgetBlockedError is returned by Hold and WithReservation when the server
// blocks the reservation. It is not a *runcaperr.Error: the call succeeded
// and the answer was no. Nothing is held.
type BudgetBlockedError struct {
	// RunID is the run the reservation was for.
	RunID string
	// Response is the ReserveResponse with the block decision, its reason
	// and the run's budget state.
	Response *runcapv1.ReserveResponse
}

func (e *BudgetBlockedError) Error() string {
	r := e.Response
	msg := fmt.Sprintf("runcap: reservation %q of run %q was blocked (%s): %d of %d micros remain",
		r.GetReservationId(), e.RunID, r.GetReason(), r.GetState().GetRemainingMicros(), r.GetState().GetLimitMicros())
	if s := r.GetBlockingScope(); s != nil && (s.GetKind() != runcapv1.ScopeKind_SCOPE_KIND_RUN || s.GetId() != e.RunID) {
		msg += fmt.Sprintf(" (blocked by %s %q", s.GetKind(), s.GetId())
		if p := r.GetBlockingPeriod(); p != runcapv1.Period_PERIOD_UNSPECIFIED {
			msg += ", " + p.String()
		}
		msg += ")"
	}
	return msg
}

// Is makes errors.Is(err, ErrBudgetBlocked) true.
func (e *BudgetBlockedError) Is(target error) bool { return target == ErrBudgetBlocked }

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

// Hold is an allowed reservation: an amount held against a run until it is
// committed or refunded (or expires at its ttl). Commit and Refund retry
// safely: the reservation id makes them idempotent. A Hold is safe for
// concurrent use.
type Hold struct {
	client *Client
	// RunID is the run the amount is held against.
	RunID string
	// ReservationID is the reservation's id.
	ReservationID string
	// Response is the ReserveResponse (an allow decision).
	Response *runcapv1.ReserveResponse

	mu             sync.Mutex
	actual         *int64
	release        bool
	commitResponse *runcapv1.CommitResponse
	refundResponse *runcapv1.RefundResponse
}

// Hold reserves amountMicros against the run and returns the hold. When the
// server blocks the reservation it returns a *BudgetBlockedError (matching
// ErrBudgetBlocked); other failures are *runcaperr.Error. The reservation id
// is generated on the client unless given, so the Reserve is retried safely.
// Settle the hold with Commit or Refund; see WithReservation for a helper
// that always settles.
func (c *Client) Hold(ctx context.Context, runID string, amountMicros int64, opts ...ReserveOption) (*Hold, error) {
	req := reserveRequest(runID, amountMicros, opts)
	resp, err := call(ctx, c, true, c.stub.Reserve, req)
	if err != nil {
		return nil, err
	}
	if resp.GetDecision() != runcapv1.Decision_DECISION_ALLOW {
		return nil, &BudgetBlockedError{RunID: runID, Response: resp}
	}
	return &Hold{client: c, RunID: runID, ReservationID: resp.GetReservationId(), Response: resp}, nil
}

// AmountMicros is the amount held.
func (h *Hold) AmountMicros() int64 { return h.Response.GetAmountMicros() }

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
// spent).
func (h *Hold) SetActual(actualMicros int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.actual = &actualMicros
	h.release = false
}

// Release makes WithReservation refund the whole hold when the func returns
// (the call did not happen).
func (h *Hold) Release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.actual = nil
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

// outcome decides how WithReservation settles: commit (with the amount) or
// refund.
func (h *Hold) outcome(failed bool) (commit bool, actual int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.actual != nil:
		return true, *h.actual
	case failed || h.release:
		return false, 0
	}
	return true, h.Response.GetAmountMicros()
}

// WithReservation holds amountMicros for the duration of fn and always
// settles the hold when fn returns:
//
//   - fn returns nil: the hold is committed with the amount given to
//     SetActual, or with the whole held amount when SetActual was not
//     called; after Release it is refunded instead;
//   - fn returns an error or panics: the hold is refunded, unless SetActual
//     was called, in which case that cost is committed (the money was
//     spent). The error is returned (the panic re-raised); when settling
//     fails too, the returned error wraps both, and the hold expires at its
//     ttl.
//
// Settling uses a context that is not cancelled with ctx, so a cancelled
// call still gets refunded. A block returns a *BudgetBlockedError and fn is
// not called.
func (c *Client) WithReservation(ctx context.Context, runID string, amountMicros int64,
	fn func(ctx context.Context, h *Hold) error, opts ...ReserveOption,
) (err error) {
	h, err := c.Hold(ctx, runID, amountMicros, opts...)
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
	ctx = context.WithoutCancel(ctx)
	commit, actual := h.outcome(failed)
	if commit {
		_, err := h.Commit(ctx, actual)
		return err
	}
	_, err := h.Refund(ctx)
	return err
}
