package runcap

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

// capableCall is an LLM call that needs every capability there is.
var capableCall = LLMCall{
	Provider: "openai", Model: "gpt-4o", InputTokens: 1_200, MaxOutputTokens: 500,
	NeedsTools: true, NeedsJSONSchema: true, MinContextTokens: 32_000, Modalities: []string{"image", "audio"},
}

var (
	miniAlternative  = &runcapv1.Alternative{Provider: "openai", Model: "gpt-4o-mini", AmountMicros: 900, EffectiveMaxOutputTokens: 500}
	haikuAlternative = &runcapv1.Alternative{Provider: "anthropic", Model: "claude-haiku", AmountMicros: 1_400, EffectiveMaxOutputTokens: 500}
)

// downgradeSuffix makes the id a downgrade is held under: not the one the
// client asked with.
const downgradeSuffix = ":downgrade"

// downgradeAnswer is a run with AutoDowngrade: gpt-4o does not fit,
// gpt-4o-mini is held instead, under an id of the server's.
func downgradeAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:      runcapv1.Decision_DECISION_DOWNGRADE,
		Reason:        runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
		ReservationId: req.GetReservationId() + downgradeSuffix,
		AmountMicros:  miniAlternative.GetAmountMicros(),
		Estimate: &runcapv1.LlmEstimate{
			Provider: miniAlternative.GetProvider(), Model: miniAlternative.GetModel(),
			InputTokens: req.GetLlmCall().GetInputTokens(), AmountMicros: miniAlternative.GetAmountMicros(),
		},
		DecisionId:     "dec-downgrade",
		Alternatives:   []*runcapv1.Alternative{miniAlternative, haikuAlternative},
		RequestedModel: req.GetLlmCall().GetModel(),
	}
}

// alternativesBlockAnswer is gpt-4o blocked by money, with two cheaper
// models that would fit.
func alternativesBlockAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_BLOCK,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
		ReservationId:     req.GetReservationId(),
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_SPEND,
		State:             &runcapv1.BudgetState{LimitMicros: 10_000, RemainingMicros: 1_500},
		Estimate:          &runcapv1.LlmEstimate{Provider: "openai", Model: "gpt-4o", AmountMicros: 6_400},
		DecisionId:        "dec-block",
		Alternatives:      []*runcapv1.Alternative{miniAlternative, haikuAlternative},
	}
}

func sameAlternatives(got, want []*runcapv1.Alternative) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range want {
		if !proto.Equal(got[i], want[i]) {
			return false
		}
	}
	return true
}

func TestAnLLMCallSendsWhatItNeedsFromAModel(t *testing.T) {
	want := &runcapv1.LlmCall{
		Provider: "openai", Model: "gpt-4o", InputTokens: 1_200, MaxOutputTokens: proto.Int64(500),
		NeedsTools: true, NeedsJsonSchema: true, MinContextTokens: proto.Int64(32_000), Modalities: []string{"image", "audio"},
	}
	got := capableCall.Proto()
	if !proto.Equal(got, want) {
		t.Fatalf("Proto() = %v, want %v", got, want)
	}
	got.Modalities[0] = "video" // the message has its own copy
	if capableCall.Modalities[0] != "image" {
		t.Fatal("Proto() shares the Modalities slice")
	}
	plain := LLMCall{Provider: "openai", Model: "gpt-4o", InputTokens: 1}.Proto()
	if plain.MinContextTokens != nil || plain.GetNeedsTools() || plain.GetNeedsJsonSchema() || len(plain.GetModalities()) != 0 {
		t.Fatalf("a plain call needs nothing special: %v", plain)
	}

	stub := &policyStub{}
	c := newClient(stub, newConfig(nil))
	ctx := context.Background()
	if _, err := c.ReserveLLM(ctx, "run-1", capableCall); err != nil {
		t.Fatal(err)
	}
	if _, err := c.HoldLLM(ctx, "run-1", capableCall); err != nil {
		t.Fatal(err)
	}
	for i, req := range stub.reserves {
		if !proto.Equal(req.GetLlmCall(), want) {
			t.Errorf("reserve %d sent %v, want %v", i, req.GetLlmCall(), want)
		}
	}
}

func TestCreateRunSendsTheDowngradeSettings(t *testing.T) {
	stub := &policyStub{}
	c := newClient(stub, newConfig(nil))
	policy := &runcapv1.RunPolicy{AutoDowngrade: true, DowngradeModels: []string{"openai/gpt-4o-mini"}}
	if _, err := c.CreateRun(context.Background(), "run-1", 5, Policy(policy)); err != nil {
		t.Fatal(err)
	}
	policy.DowngradeModels[0] = "openai/gpt-4o" // the option copied it
	sent := stub.creates[0].GetPolicy()
	if !sent.GetAutoDowngrade() || len(sent.GetDowngradeModels()) != 1 || sent.GetDowngradeModels()[0] != "openai/gpt-4o-mini" {
		t.Fatalf("CreateRun sent %v", sent)
	}
}

func TestADowngradeIsHeldAndSettledUnderTheAnsweredID(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{downgradeAnswer, downgradeAnswer}}
	c := newClient(stub, newConfig(nil))
	called := false
	err := c.WithLLMReservation(ctx, "run-1", capableCall, func(_ context.Context, h *Hold) error {
		called = true
		if !h.Downgraded() || h.Warning() || h.FailedOpen() {
			t.Errorf("Downgraded() = %v, Warning() = %v, FailedOpen() = %v", h.Downgraded(), h.Warning(), h.FailedOpen())
		}
		if h.Provider() != "openai" || h.Model() != "gpt-4o-mini" || h.RequestedModel() != "gpt-4o" {
			t.Errorf("Provider() = %q, Model() = %q, RequestedModel() = %q", h.Provider(), h.Model(), h.RequestedModel())
		}
		if h.AmountMicros() != 900 || h.DecisionID() != "dec-downgrade" ||
			!sameAlternatives(h.Alternatives(), []*runcapv1.Alternative{miniAlternative, haikuAlternative}) {
			t.Errorf("downgrade hold: %v", h.Response)
		}
		h.SetUsage(TokenUsage{InputTokens: 1_200, OutputTokens: 200})
		return nil
	})
	if err != nil || !called {
		t.Fatalf("WithLLMReservation: %v (called %v)", err, called)
	}
	wantID := stub.reserves[0].GetReservationId() + downgradeSuffix
	if len(stub.commits) != 1 || stub.commits[0].GetReservationId() != wantID || stub.commits[0].GetUsage().GetOutputTokens() != 200 {
		t.Fatalf("commits %v, want one of %q", stub.commits, wantID)
	}

	// A failing callback refunds it, under the same kind of id.
	fail := errors.New("the call failed")
	err = c.WithLLMReservation(ctx, "run-1", capableCall, func(context.Context, *Hold) error { return fail })
	if !errors.Is(err, fail) {
		t.Fatalf("want the callback's error, got %v", err)
	}
	wantID = stub.reserves[1].GetReservationId() + downgradeSuffix
	if len(stub.refunds) != 1 || stub.refunds[0].GetReservationId() != wantID {
		t.Fatalf("refunds %v, want one of %q", stub.refunds, wantID)
	}
}

func TestAHeldDowngradeCommitsUnderTheAnsweredID(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{downgradeAnswer}}
	c := newClient(stub, newConfig(nil))
	h, err := c.HoldLLM(ctx, "run-1", capableCall, ReservationID("res-1"))
	if err != nil {
		t.Fatal(err)
	}
	if h.ReservationID != "res-1"+downgradeSuffix || !h.Downgraded() {
		t.Fatalf("hold %q, downgraded %v", h.ReservationID, h.Downgraded())
	}
	if _, err := h.Commit(ctx, 850); err != nil {
		t.Fatal(err)
	}
	if len(stub.commits) != 1 || stub.commits[0].GetReservationId() != "res-1"+downgradeSuffix || stub.commits[0].GetActualMicros() != 850 {
		t.Fatalf("commits %v", stub.commits)
	}
}

func TestAPlainAllowIsNotDowngraded(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{
		func(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
			return &runcapv1.ReserveResponse{
				Decision: runcapv1.Decision_DECISION_ALLOW, ReservationId: req.GetReservationId(), DecisionId: "dec-allow",
				Estimate: &runcapv1.LlmEstimate{Provider: "openai", Model: "gpt-4o", AmountMicros: 6_400},
			}
		},
		failOpenAnswer,
	}}
	c := newClient(stub, newConfig(nil))
	llm, err := c.HoldLLM(ctx, "run-1", capableCall)
	if err != nil {
		t.Fatal(err)
	}
	if llm.Downgraded() || llm.Provider() != "openai" || llm.Model() != "gpt-4o" || llm.RequestedModel() != "gpt-4o" ||
		llm.DecisionID() != "dec-allow" || len(llm.Alternatives()) != 0 || llm.ReservationID != stub.reserves[0].GetReservationId() {
		t.Fatalf("allow: %v", llm.Response)
	}
	// Failed open: no estimate, so the model asked for.
	open, err := c.HoldLLM(ctx, "run-1", capableCall)
	if err != nil {
		t.Fatal(err)
	}
	if !open.FailedOpen() || open.Model() != "gpt-4o" || open.Provider() != "openai" || open.DecisionID() != "" {
		t.Fatalf("failed open: %v", open.Response)
	}
	amount, err := c.Hold(ctx, "run-1", 40)
	if err != nil {
		t.Fatal(err)
	}
	if amount.Downgraded() || amount.Model() != "" || amount.Provider() != "" || amount.RequestedModel() != "" {
		t.Fatalf("amount: %v", amount.Response)
	}
}

func TestABlockCarriesItsAlternativesAndDecisionID(t *testing.T) {
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{alternativesBlockAnswer}}
	c := newClient(stub, newConfig(nil))
	called := false
	err := c.WithLLMReservation(context.Background(), "run-1", capableCall, func(context.Context, *Hold) error { called = true; return nil })
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) || called {
		t.Fatalf("want a *BudgetBlockedError, got %v (called %v)", err, called)
	}
	if !sameAlternatives(blocked.Alternatives(), []*runcapv1.Alternative{miniAlternative, haikuAlternative}) || blocked.DecisionID() != "dec-block" {
		t.Fatalf("Alternatives() = %v, DecisionID() = %q", blocked.Alternatives(), blocked.DecisionID())
	}
	msg := err.Error()
	for _, want := range []string{"1500 of 10000 micros remain", "2 alternative model(s) fit, the cheapest openai/gpt-4o-mini at 900 micros"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	if len(stub.commits) != 0 || len(stub.refunds) != 0 {
		t.Fatalf("a block holds nothing: commits %v, refunds %v", stub.commits, stub.refunds)
	}
	bare := alternativesBlockAnswer(&runcapv1.ReserveRequest{ReservationId: "r"})
	bare.Alternatives = nil
	if msg := blockedError("run-1", bare).Error(); strings.Contains(msg, "alternative") {
		t.Fatalf("a block without alternatives mentions them: %q", msg)
	}
}

// decisionStub answers GetDecision from its decisions, after failing the
// first calls with the errors queued in fail, and with DECISION_NOT_FOUND
// for an id it does not know. Any other call panics.
type decisionStub struct {
	runcapv1.BudgetServiceClient
	mu        sync.Mutex
	requests  []*runcapv1.GetDecisionRequest
	fail      []error
	decisions map[string]*runcapv1.GetDecisionResponse
}

func (s *decisionStub) GetDecision(_ context.Context, req *runcapv1.GetDecisionRequest, _ ...grpc.CallOption) (*runcapv1.GetDecisionResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, req)
	if len(s.fail) > 0 {
		err := s.fail[0]
		s.fail = s.fail[1:]
		return nil, err
	}
	if d, ok := s.decisions[req.GetDecisionId()]; ok {
		return d, nil
	}
	st, err := status.New(codes.NotFound, "no decision "+req.GetDecisionId()).WithDetails(
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "DECISION_NOT_FOUND",
			Metadata: map[string]string{"decision_id": req.GetDecisionId()}},
		&errdetails.ResourceInfo{ResourceType: "runcap.v1.Decision", ResourceName: req.GetDecisionId()},
	)
	if err != nil {
		panic(err)
	}
	return nil, st.Err()
}

func TestGetDecision(t *testing.T) {
	ctx := context.Background()
	decision := &runcapv1.GetDecisionResponse{
		DecisionId: "dec-1", RunId: "run-1", ReservationId: "res-1", Decision: runcapv1.Decision_DECISION_DOWNGRADE,
		AmountMicros: 6_400, HeldMicros: 900, Estimate: &runcapv1.LlmEstimate{Provider: "openai", Model: "gpt-4o-mini"},
		ReservationStatus: runcapv1.ReservationStatus_RESERVATION_STATUS_COMMITTED, ActualMicros: proto.Int64(850),
	}
	stub := &decisionStub{
		decisions: map[string]*runcapv1.GetDecisionResponse{"dec-1": decision},
		fail: []error{
			statusError(t, codes.Unavailable, "SHUTTING_DOWN"),
			status.Error(codes.Unavailable, "connection refused"),
		},
	}
	c := newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))
	got, err := c.GetDecision(ctx, "dec-1")
	if err != nil || !proto.Equal(got, decision) {
		t.Fatalf("GetDecision: %v, %v", got, err)
	}
	if len(stub.requests) != 3 {
		t.Fatalf("%d attempts, want 3 (a read is retried)", len(stub.requests))
	}
	for _, req := range stub.requests {
		if !proto.Equal(req, &runcapv1.GetDecisionRequest{DecisionId: "dec-1"}) {
			t.Fatalf("request %v", req)
		}
	}

	// An unknown decision is final: not retried, and typed.
	_, err = c.GetDecision(ctx, "dec-gone")
	if !runcaperr.IsDecisionNotFound(err) || !errors.Is(err, runcaperr.ErrDecisionNotFound) ||
		runcaperr.IsRunNotFound(err) || len(stub.requests) != 4 {
		t.Fatalf("%v after %d attempts", err, len(stub.requests))
	}
	e := runcaperr.FromError(err)
	if e.Metadata["decision_id"] != "dec-gone" || e.Resource == nil || e.Resource.Name != "dec-gone" {
		t.Fatalf("%+v", e)
	}
}
