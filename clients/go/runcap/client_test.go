package runcap_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/runcap/runcap/clients/go/internal/testserver"
	"github.com/runcap/runcap/clients/go/runcap"
	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

func TestLifecycleWithReplays(t *testing.T) {
	c := dial(t, addr)
	ctx := testContext(t)
	runID := "go-life-" + runcap.NewReservationID()[:8]

	created, err := c.CreateRun(ctx, runID, 1_000_000,
		runcap.Labels(map[string]string{"agent": "go-test"}), runcap.DefaultTTL(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	if created.GetReplayed() || created.GetState().GetRevision() != 1 || created.GetRun().GetDefaultTtlMillis() != 60_000 {
		t.Fatalf("CreateRun: %v", created)
	}
	again, err := c.CreateRun(ctx, runID, 1_000_000,
		runcap.Labels(map[string]string{"agent": "go-test"}), runcap.DefaultTTL(time.Minute))
	if err != nil || !again.GetReplayed() {
		t.Fatalf("CreateRun replay: %v, %v", again, err)
	}

	got, err := c.GetRun(ctx, runID)
	if err != nil {
		t.Fatal(err)
	}
	if got.GetRun().GetLabels()["agent"] != "go-test" || got.GetState().GetRemainingMicros() != 1_000_000 {
		t.Fatalf("GetRun: %v", got)
	}

	r1, err := c.Reserve(ctx, runID, 300_000, runcap.ReservationID("r1"), runcap.TTL(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if r1.GetDecision() != runcapv1.Decision_DECISION_ALLOW || r1.GetReservationId() != "r1" || r1.GetReplayed() {
		t.Fatalf("Reserve: %v", r1)
	}
	r1again, err := c.Reserve(ctx, runID, 300_000, runcap.ReservationID("r1"), runcap.TTL(30*time.Second))
	if err != nil || !r1again.GetReplayed() || r1again.GetDecision() != runcapv1.Decision_DECISION_ALLOW {
		t.Fatalf("Reserve replay: %v, %v", r1again, err)
	}

	// A reservation without an id gets a client-side one.
	r2, err := c.Reserve(ctx, runID, 200_000)
	if err != nil {
		t.Fatal(err)
	}
	if len(r2.GetReservationId()) != 32 {
		t.Fatalf("generated reservation id %q", r2.GetReservationId())
	}

	committed, err := c.Commit(ctx, runID, "r1", 250_000)
	if err != nil {
		t.Fatal(err)
	}
	if committed.GetReservationStatus() != runcapv1.ReservationStatus_RESERVATION_STATUS_COMMITTED ||
		committed.GetState().GetCommittedMicros() != 250_000 || committed.GetReplayed() {
		t.Fatalf("Commit: %v", committed)
	}
	if again, err := c.Commit(ctx, runID, "r1", 250_000); err != nil || !again.GetReplayed() {
		t.Fatalf("Commit replay: %v, %v", again, err)
	}

	refunded, err := c.Refund(ctx, runID, r2.GetReservationId())
	if err != nil {
		t.Fatal(err)
	}
	if refunded.GetReleasedMicros() != 200_000 || refunded.GetReplayed() || refunded.GetState().GetReservedMicros() != 0 {
		t.Fatalf("Refund: %v", refunded)
	}
	if again, err := c.Refund(ctx, runID, r2.GetReservationId()); err != nil || !again.GetReplayed() || again.GetReleasedMicros() != 0 {
		t.Fatalf("Refund replay: %v, %v", again, err)
	}

	closed, err := c.CloseRun(ctx, runID)
	if err != nil || closed.GetReplayed() || closed.GetState().GetStatus() != runcapv1.RunStatus_RUN_STATUS_CLOSED {
		t.Fatalf("CloseRun: %v, %v", closed, err)
	}
	if again, err := c.CloseRun(ctx, runID); err != nil || !again.GetReplayed() {
		t.Fatalf("CloseRun replay: %v, %v", again, err)
	}

	// A block is a response, not an error.
	blocked, err := c.Reserve(ctx, runID, 1)
	if err != nil {
		t.Fatal(err)
	}
	if blocked.GetDecision() != runcapv1.Decision_DECISION_BLOCK ||
		blocked.GetReason() != runcapv1.DecisionReason_DECISION_REASON_RUN_CLOSED {
		t.Fatalf("Reserve on a closed run: %v", blocked)
	}
}

func TestConcurrentReservesAllowExactlyWhatFits(t *testing.T) {
	const calls, fits, amount = 200, 37, 1_000
	c := dial(t, addr)
	ctx := testContext(t)
	runID := newRun(t, c, fits*amount)

	var allowed, blocked atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, calls)
	for range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := c.Reserve(ctx, runID, amount)
			if err != nil {
				errs <- err
				return
			}
			switch resp.GetDecision() {
			case runcapv1.Decision_DECISION_ALLOW:
				allowed.Add(1)
			case runcapv1.Decision_DECISION_BLOCK:
				if resp.GetReason() != runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET {
					errs <- errors.New("block reason " + resp.GetReason().String())
				}
				blocked.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if allowed.Load() != fits || blocked.Load() != calls-fits {
		t.Fatalf("allowed %d, blocked %d; want %d, %d", allowed.Load(), blocked.Load(), fits, calls-fits)
	}
	state, err := c.GetRun(ctx, runID)
	if err != nil {
		t.Fatal(err)
	}
	s := state.GetState()
	if s.GetReservedMicros() != fits*amount || s.GetRemainingMicros() != 0 || s.GetActiveReservations() != fits {
		t.Fatalf("state after the race: %v", s)
	}
}

func TestTypedErrors(t *testing.T) {
	c := dial(t, addr)
	ctx := testContext(t)
	runID := newRun(t, c, 10_000)

	t.Run("run not found", func(t *testing.T) {
		_, err := c.GetRun(ctx, "go-no-such-run")
		if !runcaperr.IsNotFound(err) || !runcaperr.IsRunNotFound(err) || runcaperr.IsReservationNotFound(err) {
			t.Fatalf("err = %v", err)
		}
		if !errors.Is(err, runcaperr.ErrRunNotFound) || status.Code(err) != codes.NotFound {
			t.Fatalf("errors.Is / status.Code: %v", err)
		}
		var e *runcaperr.Error
		if !errors.As(err, &e) {
			t.Fatalf("not a *runcaperr.Error: %T", err)
		}
		if e.Reason != runcapv1.ErrorReason_ERROR_REASON_RUN_NOT_FOUND || e.Domain != runcaperr.Domain ||
			e.Metadata["run_id"] != "go-no-such-run" || e.Resource == nil || e.Resource.Name != "go-no-such-run" ||
			e.Resource.Type != "runcap.v1.Run" {
			t.Fatalf("details: %+v", e)
		}
	})

	t.Run("reservation not found", func(t *testing.T) {
		_, err := c.Commit(ctx, runID, "nope", 1)
		if !runcaperr.IsReservationNotFound(err) || runcaperr.IsRunNotFound(err) {
			t.Fatalf("err = %v", err)
		}
		if e := runcaperr.FromError(err); e.Resource.Name != runID+"/nope" {
			t.Fatalf("resource: %+v", e.Resource)
		}
	})

	t.Run("invalid argument", func(t *testing.T) {
		_, err := c.CreateRun(ctx, "bad id with spaces", -5)
		if !runcaperr.IsInvalidArgument(err) {
			t.Fatalf("err = %v", err)
		}
		fields := map[string]bool{}
		for _, v := range runcaperr.FieldViolations(err) {
			if v.Description == "" {
				t.Errorf("violation of %s has no description", v.Field)
			}
			fields[v.Field] = true
		}
		if !fields["run_id"] || !fields["limit_micros"] {
			t.Fatalf("field violations %v; want run_id and limit_micros", runcaperr.FieldViolations(err))
		}
		if e := runcaperr.FromError(err); e.Reason != runcapv1.ErrorReason_ERROR_REASON_INVALID_ARGUMENT {
			t.Fatalf("reason %v", e.Reason)
		}
	})

	t.Run("run already exists", func(t *testing.T) {
		_, err := c.CreateRun(ctx, runID, 20_000)
		if !runcaperr.IsRunAlreadyExists(err) || !runcaperr.IsAlreadyExists(err) || runcaperr.IsIdempotencyConflict(err) {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("idempotency conflict", func(t *testing.T) {
		if _, err := c.Reserve(ctx, runID, 100, runcap.ReservationID("ic")); err != nil {
			t.Fatal(err)
		}
		_, err := c.Reserve(ctx, runID, 200, runcap.ReservationID("ic"))
		if !runcaperr.IsIdempotencyConflict(err) || runcaperr.Code(err) != codes.AlreadyExists {
			t.Fatalf("err = %v", err)
		}
		if e := runcaperr.FromError(err); e.Metadata["reservation_id"] != "ic" {
			t.Fatalf("metadata %v", e.Metadata)
		}
	})

	t.Run("failed precondition", func(t *testing.T) {
		blocked, err := c.Reserve(ctx, runID, 1_000_000, runcap.ReservationID("too-big"))
		if err != nil || blocked.GetDecision() != runcapv1.Decision_DECISION_BLOCK {
			t.Fatalf("Reserve: %v, %v", blocked, err)
		}
		_, err = c.Commit(ctx, runID, "too-big", 1)
		if !runcaperr.IsReservationBlocked(err) || !runcaperr.IsFailedPrecondition(err) {
			t.Fatalf("commit of a blocked reservation: %v", err)
		}
		e := runcaperr.FromError(err)
		if len(e.PreconditionViolations) != 1 || e.PreconditionViolations[0].Type != "RESERVATION_BLOCKED" ||
			e.PreconditionViolations[0].Subject != runID+"/too-big" {
			t.Fatalf("precondition violations %+v", e.PreconditionViolations)
		}

		if _, err := c.Reserve(ctx, runID, 100, runcap.ReservationID("rel")); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Refund(ctx, runID, "rel"); err != nil {
			t.Fatal(err)
		}
		_, err = c.Commit(ctx, runID, "rel", 100)
		if !runcaperr.IsReservationReleased(err) {
			t.Fatalf("commit after refund: %v", err)
		}
	})

	t.Run("out of range", func(t *testing.T) {
		stream := c.Watch(ctx, runID, runcap.AfterRevision(1_000_000))
		defer stream.Close()
		_, err := stream.Recv()
		if !runcaperr.IsRevisionOutOfRange(err) || !runcaperr.IsOutOfRange(err) {
			t.Fatalf("err = %v", err)
		}
		if e := runcaperr.FromError(err); e.Metadata["after_revision"] != "1000000" {
			t.Fatalf("metadata %v", e.Metadata)
		}
	})
}

func TestUnavailableIsRetriedThenTyped(t *testing.T) {
	port, err := testserver.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	target := fmt.Sprintf("127.0.0.1:%d", port) // nothing listens there
	policy := runcap.RetryPolicy{MaxAttempts: 3, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, Multiplier: 2}
	c := dial(t, target, runcap.WithRetry(policy), runcap.WithTimeout(2*time.Second))
	start := time.Now()
	_, err = c.GetRun(testContext(t), "anything")
	if !runcaperr.IsUnavailable(err) {
		t.Fatalf("err = %v", err)
	}
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Fatalf("took %v", elapsed)
	}
}

func TestHoldCommitsAndRefunds(t *testing.T) {
	c := dial(t, addr)
	ctx := testContext(t)
	runID := newRun(t, c, 100_000)

	h, err := c.Hold(ctx, runID, 40_000)
	if err != nil {
		t.Fatal(err)
	}
	if h.AmountMicros() != 40_000 || h.State().GetReservedMicros() != 40_000 {
		t.Fatalf("hold: %v", h.Response)
	}
	if resp, err := h.Commit(ctx, 30_000); err != nil || resp.GetActualMicros() != 30_000 {
		t.Fatalf("Commit: %v, %v", resp, err)
	}

	h2, err := c.Hold(ctx, runID, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := h2.Refund(ctx); err != nil || resp.GetReleasedMicros() != 10_000 {
		t.Fatalf("Refund: %v, %v", resp, err)
	}

	// Blocked: a typed error, not a *runcaperr.Error.
	_, err = c.Hold(ctx, runID, 1_000_000)
	var blocked *runcap.BudgetBlockedError
	if !errors.Is(err, runcap.ErrBudgetBlocked) || !errors.As(err, &blocked) || runcaperr.FromError(err) != nil {
		t.Fatalf("Hold over budget: %v", err)
	}
	if blocked.Reason() != runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET || blocked.State().GetRemainingMicros() != 70_000 {
		t.Fatalf("blocked: %v", blocked.Response)
	}

	t.Run("success commits the actual cost", func(t *testing.T) {
		var hold *runcap.Hold
		err := c.WithReservation(ctx, runID, 20_000, func(_ context.Context, h *runcap.Hold) error {
			hold = h
			h.SetActual(5_000)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if hold.CommitResponse().GetActualMicros() != 5_000 || hold.State().GetCommittedMicros() != 35_000 {
			t.Fatalf("commit: %v", hold.CommitResponse())
		}
	})

	t.Run("success without SetActual commits the hold", func(t *testing.T) {
		var hold *runcap.Hold
		if err := c.WithReservation(ctx, runID, 1_000, func(_ context.Context, h *runcap.Hold) error {
			hold = h
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if hold.CommitResponse().GetActualMicros() != 1_000 {
			t.Fatalf("commit: %v", hold.CommitResponse())
		}
	})

	t.Run("error refunds", func(t *testing.T) {
		boom := errors.New("model call failed")
		var hold *runcap.Hold
		err := c.WithReservation(ctx, runID, 20_000, func(_ context.Context, h *runcap.Hold) error {
			hold = h
			return boom
		})
		if !errors.Is(err, boom) {
			t.Fatalf("err = %v", err)
		}
		if hold.RefundResponse().GetReleasedMicros() != 20_000 || hold.CommitResponse() != nil {
			t.Fatalf("refund: %v", hold.RefundResponse())
		}
	})

	t.Run("panic refunds and re-panics", func(t *testing.T) {
		var hold *runcap.Hold
		func() {
			defer func() {
				if r := recover(); r != "kaboom" {
					t.Fatalf("recovered %v", r)
				}
			}()
			_ = c.WithReservation(ctx, runID, 20_000, func(_ context.Context, h *runcap.Hold) error {
				hold = h
				panic("kaboom")
			})
		}()
		if hold.RefundResponse().GetReleasedMicros() != 20_000 {
			t.Fatalf("refund: %v", hold.RefundResponse())
		}
	})

	t.Run("blocked does not call fn", func(t *testing.T) {
		called := false
		err := c.WithReservation(ctx, runID, 1_000_000, func(context.Context, *runcap.Hold) error {
			called = true
			return nil
		})
		if !errors.Is(err, runcap.ErrBudgetBlocked) || called {
			t.Fatalf("err = %v, called = %v", err, called)
		}
	})

	state, err := c.GetRun(ctx, runID)
	if err != nil {
		t.Fatal(err)
	}
	if s := state.GetState(); s.GetReservedMicros() != 0 || s.GetCommittedMicros() != 36_000 || s.GetActiveReservations() != 0 {
		t.Fatalf("final state %v", s)
	}
}
