package runcap

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

// policyStub records CreateRun, Reserve, Commit and Refund requests; Reserve
// answers with the queued answers first, then an allow. Any other call
// panics (the embedded interface is nil). No server is involved.
type policyStub struct {
	runcapv1.BudgetServiceClient
	mu       sync.Mutex
	creates  []*runcapv1.CreateRunRequest
	reserves []*runcapv1.ReserveRequest
	commits  []*runcapv1.CommitRequest
	refunds  []*runcapv1.RefundRequest
	answers  []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse
}

func (s *policyStub) CreateRun(_ context.Context, req *runcapv1.CreateRunRequest, _ ...grpc.CallOption) (*runcapv1.CreateRunResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.creates = append(s.creates, req)
	return &runcapv1.CreateRunResponse{Run: &runcapv1.Run{RunId: req.GetRunId(), Policy: req.GetPolicy()}}, nil
}

func (s *policyStub) Reserve(_ context.Context, req *runcapv1.ReserveRequest, _ ...grpc.CallOption) (*runcapv1.ReserveResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserves = append(s.reserves, req)
	if len(s.answers) > 0 {
		answer := s.answers[0]
		s.answers = s.answers[1:]
		return answer(req), nil
	}
	return &runcapv1.ReserveResponse{
		Decision:      runcapv1.Decision_DECISION_ALLOW,
		Reason:        runcapv1.DecisionReason_DECISION_REASON_WITHIN_BUDGET,
		ReservationId: req.GetReservationId(),
		AmountMicros:  req.GetAmountMicros(),
	}, nil
}

func (s *policyStub) Commit(_ context.Context, req *runcapv1.CommitRequest, _ ...grpc.CallOption) (*runcapv1.CommitResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.commits = append(s.commits, req)
	return &runcapv1.CommitResponse{ActualMicros: req.GetActualMicros()}, nil
}

func (s *policyStub) Refund(_ context.Context, req *runcapv1.RefundRequest, _ ...grpc.CallOption) (*runcapv1.RefundResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refunds = append(s.refunds, req)
	return &runcapv1.RefundResponse{}, nil
}

// warnAnswer is an advisory run's answer to a call over its meter's
// ceiling: held anyway.
func warnAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_WARN,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
		ReservationId:     req.GetReservationId(),
		AmountMicros:      req.GetAmountMicros(),
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_METER,
		BlockingMeter:     req.GetMeter(),
		EnforcementMode:   runcapv1.EnforcementMode_ENFORCEMENT_MODE_ADVISORY,
	}
}

// failOpenAnswer is an advisory run's answer while the storage is down:
// nothing is held.
func failOpenAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:        runcapv1.Decision_DECISION_WARN,
		Reason:          runcapv1.DecisionReason_DECISION_REASON_BACKEND_UNAVAILABLE,
		ReservationId:   req.GetReservationId(),
		EnforcementMode: runcapv1.EnforcementMode_ENFORCEMENT_MODE_ADVISORY,
	}
}

// throttleAnswer is a rate-limited call: nothing held, come back in 1.5 s.
func throttleAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_THROTTLE,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_RATE_LIMITED,
		ReservationId:     req.GetReservationId(),
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_RATE,
		RetryAfter:        durationpb.New(1500 * time.Millisecond),
		EnforcementMode:   runcapv1.EnforcementMode_ENFORCEMENT_MODE_HARD_GATE,
	}
}

func meterBlockAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_BLOCK,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
		ReservationId:     req.GetReservationId(),
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_METER,
		BlockingMeter:     req.GetMeter(),
		State:             &runcapv1.BudgetState{LimitMicros: 1000, RemainingMicros: 1000},
	}
}

func TestCreateRunSendsThePolicy(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{}
	c := newClient(stub, newConfig(nil))
	policy := &runcapv1.RunPolicy{
		EnforcementMode:       runcapv1.EnforcementMode_ENFORCEMENT_MODE_SOFT_GATE,
		SoftGateMarginPercent: 10,
		Thresholds:            &runcapv1.Thresholds{InfoPercent: 50, ThrottlePercent: 90},
		ThrottleBaseDelay:     durationpb.New(250 * time.Millisecond),
		MaxTokens:             proto.Int64(100_000),
		MeterLimits:           map[string]int64{"tool:serp_api": 50},
		RateLimit:             &runcapv1.RateLimit{MaxCalls: 30, Window: durationpb.New(time.Minute)},
		MaxInFlight:           proto.Int32(4),
		MaxChildren:           proto.Int32(0),
	}
	want := proto.Clone(policy).(*runcapv1.RunPolicy)
	created, err := c.CreateRun(ctx, "run-1", 5, Policy(policy), TeamID("team-7"))
	if err != nil {
		t.Fatal(err)
	}
	policy.MaxInFlight = proto.Int32(99) // the option copied it
	if !proto.Equal(created.GetRun().GetPolicy(), want) {
		t.Fatalf("run policy = %v, want %v", created.GetRun().GetPolicy(), want)
	}
	if _, err := c.CreateRun(ctx, "run-2", 5); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateRun(ctx, "run-3", 5, Policy(want), Policy(nil)); err != nil {
		t.Fatal(err)
	}
	wantRequests := []*runcapv1.CreateRunRequest{
		{RunId: "run-1", LimitMicros: 5, TeamId: "team-7", Policy: want},
		{RunId: "run-2", LimitMicros: 5},
		{RunId: "run-3", LimitMicros: 5},
	}
	if len(stub.creates) != len(wantRequests) {
		t.Fatalf("%d requests, want %d", len(stub.creates), len(wantRequests))
	}
	for i := range wantRequests {
		if !proto.Equal(stub.creates[i], wantRequests[i]) {
			t.Errorf("request %d = %v, want %v", i, stub.creates[i], wantRequests[i])
		}
	}
	if stub.creates[0].GetPolicy().GetMaxChildren() != 0 || stub.creates[0].GetPolicy().MaxChildren == nil {
		t.Error("a cap of zero children must be sent as set")
	}
}

func TestReserveSendsTheMeter(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{}
	c := newClient(stub, newConfig(nil))
	if _, err := c.Reserve(ctx, "run-1", 40, Meter("tool:serp_api"), MeterUnits(3)); err != nil {
		t.Fatal(err)
	}
	h, err := c.Hold(ctx, "run-1", 40, Meter("tool:browse"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReserveLLM(ctx, "run-1", gpt4o, Meter("llm"), ReservationID("res-1")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Reserve(ctx, "run-1", 40); err != nil {
		t.Fatal(err)
	}
	once, held, llm, plain := stub.reserves[0], stub.reserves[1], stub.reserves[2], stub.reserves[3]
	if once.GetMeter() != "tool:serp_api" || once.MeterUnits == nil || once.GetMeterUnits() != 3 {
		t.Errorf("Reserve with a meter sent %v", once)
	}
	if held.GetMeter() != "tool:browse" || held.MeterUnits != nil || held.GetReservationId() != h.ReservationID {
		t.Errorf("Hold with a meter sent %v", held)
	}
	if llm.GetMeter() != "llm" || llm.GetLlmCall() == nil || llm.GetReservationId() != "res-1" {
		t.Errorf("ReserveLLM with a meter sent %v", llm)
	}
	if plain.GetMeter() != "" || plain.MeterUnits != nil {
		t.Errorf("Reserve without a meter sent %v", plain)
	}
}

func TestAWarningIsHeldAndSaysSo(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{warnAnswer}}
	c := newClient(stub, newConfig(nil))
	called := false
	err := c.WithReservation(ctx, "run-1", 40, func(_ context.Context, h *Hold) error {
		called = true
		if !h.Warning() || h.FailedOpen() {
			t.Errorf("Warning() = %v, FailedOpen() = %v", h.Warning(), h.FailedOpen())
		}
		if h.Reason() != runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET ||
			h.Dimension() != runcapv1.BudgetDimension_BUDGET_DIMENSION_METER ||
			h.Response.GetBlockingMeter() != "tool:serp_api" || h.AmountMicros() != 40 {
			t.Errorf("warning hold: %v", h.Response)
		}
		h.SetActual(30)
		return nil
	}, Meter("tool:serp_api"))
	if err != nil || !called {
		t.Fatalf("WithReservation: %v (called %v)", err, called)
	}
	if len(stub.commits) != 1 || stub.commits[0].GetActualMicros() != 30 ||
		stub.commits[0].GetReservationId() != stub.reserves[0].GetReservationId() {
		t.Fatalf("commits %v", stub.commits)
	}

	// A plain allow is no warning.
	h, err := c.Hold(ctx, "run-1", 40)
	if err != nil || h.Warning() || h.Dimension() != runcapv1.BudgetDimension_BUDGET_DIMENSION_UNSPECIFIED ||
		h.Reason() != runcapv1.DecisionReason_DECISION_REASON_WITHIN_BUDGET {
		t.Fatalf("plain hold %v, %v", h, err)
	}
}

func TestAFailedOpenWarningSettlesNothing(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{failOpenAnswer, failOpenAnswer}}
	c := newClient(stub, newConfig(nil))
	calls := 0
	fn := func(fail bool) func(context.Context, *Hold) error {
		return func(_ context.Context, h *Hold) error {
			calls++
			if !h.Warning() || !h.FailedOpen() {
				t.Errorf("Warning() = %v, FailedOpen() = %v", h.Warning(), h.FailedOpen())
			}
			h.SetActual(30)
			if fail {
				return errors.New("the call failed")
			}
			return nil
		}
	}
	if err := c.WithReservation(ctx, "run-1", 40, fn(false)); err != nil {
		t.Fatal(err)
	}
	if err := c.WithReservation(ctx, "run-1", 40, fn(true)); err == nil || err.Error() != "the call failed" {
		t.Fatalf("want the callback's own error, got %v", err)
	}
	if calls != 2 || len(stub.commits) != 0 || len(stub.refunds) != 0 {
		t.Fatalf("%d calls, commits %v, refunds %v", calls, stub.commits, stub.refunds)
	}
}

func TestAThrottleIsATypedErrorWithRetryAfter(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{throttleAnswer, throttleAnswer}}
	c := newClient(stub, newConfig(nil))

	_, err := c.Hold(ctx, "run-1", 40)
	var throttled *BudgetThrottledError
	if !errors.As(err, &throttled) {
		t.Fatalf("want a *BudgetThrottledError, got %T %v", err, err)
	}
	if throttled.RetryAfter() != 1500*time.Millisecond ||
		throttled.Dimension() != runcapv1.BudgetDimension_BUDGET_DIMENSION_RATE ||
		throttled.Reason() != runcapv1.DecisionReason_DECISION_REASON_RATE_LIMITED ||
		throttled.EnforcementMode() != runcapv1.EnforcementMode_ENFORCEMENT_MODE_HARD_GATE ||
		throttled.RunID != "run-1" {
		t.Fatalf("throttled: %v", throttled.Response)
	}
	if !errors.Is(err, ErrBudgetThrottled) || !errors.Is(err, ErrBudgetBlocked) || errors.Is(err, ErrUnknownPrice) {
		t.Fatalf("errors.Is on %v", err)
	}
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) || blocked.Response != throttled.Response {
		t.Fatalf("errors.As must find a throttle as a *BudgetBlockedError: %v", blocked)
	}
	if runcaperr.FromError(err) != nil {
		t.Fatal("a throttle is not a *runcaperr.Error")
	}
	msg := err.Error()
	for _, want := range []string{
		"was throttled (DECISION_REASON_RATE_LIMITED)",
		"rate limit is used up",
		"with a new reservation id after 1.5s",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}

	called := false
	err = c.WithReservation(ctx, "run-1", 40, func(context.Context, *Hold) error { called = true; return nil })
	if !errors.As(err, &throttled) || called {
		t.Fatalf("WithReservation: %v (called %v)", err, called)
	}
	if len(stub.commits) != 0 || len(stub.refunds) != 0 {
		t.Fatalf("a throttle holds nothing to settle: commits %v, refunds %v", stub.commits, stub.refunds)
	}
	// The next reservation gets a new id.
	h, err := c.Hold(ctx, "run-1", 40)
	if err != nil || h.ReservationID == stub.reserves[0].GetReservationId() || h.ReservationID == stub.reserves[1].GetReservationId() {
		t.Fatalf("hold after a throttle: %v, %v", h, err)
	}
}

func TestThrottleMessagesNameTheCause(t *testing.T) {
	for reason, cause := range map[runcapv1.DecisionReason]string{
		runcapv1.DecisionReason_DECISION_REASON_THROTTLED:       "throttle band",
		runcapv1.DecisionReason_DECISION_REASON_RATE_LIMITED:    "rate limit",
		runcapv1.DecisionReason_DECISION_REASON_IN_FLIGHT_LIMIT: "holds in flight",
	} {
		err := blockedError("run-1", &runcapv1.ReserveResponse{
			Decision: runcapv1.Decision_DECISION_THROTTLE, Reason: reason, RetryAfter: durationpb.New(250 * time.Millisecond),
		})
		if msg := err.Error(); !strings.Contains(msg, cause) || !strings.Contains(msg, "after 250ms") {
			t.Errorf("%v: message %q", reason, msg)
		}
	}
	// No delay given: zero.
	err := blockedError("run-1", &runcapv1.ReserveResponse{Decision: runcapv1.Decision_DECISION_THROTTLE})
	var throttled *BudgetThrottledError
	if !errors.As(err, &throttled) || throttled.RetryAfter() != 0 {
		t.Fatalf("%v", err)
	}
}

func TestABlockNamesItsDimensionAndMeter(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{meterBlockAnswer}}
	c := newClient(stub, newConfig(nil))
	_, err := c.Hold(ctx, "run-1", 40, Meter("tool:serp_api"), MeterUnits(3))
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) {
		t.Fatalf("want a *BudgetBlockedError, got %v", err)
	}
	var throttled *BudgetThrottledError
	if errors.As(err, &throttled) || errors.Is(err, ErrBudgetThrottled) {
		t.Fatalf("a block is not a throttle: %v", err)
	}
	if blocked.Dimension() != runcapv1.BudgetDimension_BUDGET_DIMENSION_METER || blocked.Meter() != "tool:serp_api" {
		t.Fatalf("Dimension() = %v, Meter() = %q", blocked.Dimension(), blocked.Meter())
	}
	if msg := err.Error(); !strings.Contains(msg, `meter "tool:serp_api" of the run is at its ceiling`) || strings.Contains(msg, "micros remain") {
		t.Fatalf("message %q", msg)
	}

	tokens := &BudgetBlockedError{RunID: "run-1", Response: &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_BLOCK,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_TOKENS,
		State:             &runcapv1.BudgetState{CommittedTokens: 900, ReservedTokens: 50},
		Estimate:          &runcapv1.LlmEstimate{Provider: "openai", Model: "gpt-4o", InputTokens: 100, EffectiveMaxOutputTokens: 20},
	}}
	msg := tokens.Error()
	if !strings.Contains(msg, "token ceiling (900 tokens committed, 50 held)") || !strings.Contains(msg, "estimated at 120 tokens") ||
		strings.Contains(msg, "micros remain") || tokens.Meter() != "" {
		t.Fatalf("message %q", msg)
	}
}

func TestADecisionTheClientDoesNotKnowIsNotHeld(t *testing.T) {
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{
		func(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
			return &runcapv1.ReserveResponse{ReservationId: req.GetReservationId()}
		},
	}}
	c := newClient(stub, newConfig(nil))
	called := false
	err := c.WithReservation(context.Background(), "run-1", 40, func(context.Context, *Hold) error { called = true; return nil })
	if !errors.Is(err, ErrBudgetBlocked) || errors.Is(err, ErrBudgetThrottled) || called {
		t.Fatalf("%v (called %v)", err, called)
	}
}
