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

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

const testPriceTable = "test-prices-1"

// pricedStub records Reserve, Commit and Refund requests and prices LLM
// calls like the server does (input plus effective max output, from a
// one-model table; other models are an unknown price). Any other call
// panics (the embedded interface is nil). No server is involved.
type pricedStub struct {
	runcapv1.BudgetServiceClient
	mu       sync.Mutex
	reserves []*runcapv1.ReserveRequest
	commits  []*runcapv1.CommitRequest
	refunds  []*runcapv1.RefundRequest
	limit    int64
}

func newPricedStub() *pricedStub { return &pricedStub{limit: 1_000_000} }

func (s *pricedStub) state(runID string) *runcapv1.BudgetState {
	return &runcapv1.BudgetState{RunId: runID, LimitMicros: s.limit, RemainingMicros: s.limit}
}

func (s *pricedStub) Reserve(_ context.Context, req *runcapv1.ReserveRequest, _ ...grpc.CallOption) (*runcapv1.ReserveResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reserves = append(s.reserves, req)
	resp := &runcapv1.ReserveResponse{
		Decision:      runcapv1.Decision_DECISION_ALLOW,
		Reason:        runcapv1.DecisionReason_DECISION_REASON_WITHIN_BUDGET,
		ReservationId: req.GetReservationId(),
		State:         s.state(req.GetRunId()),
	}
	llm := req.GetLlmCall()
	if llm == nil {
		resp.AmountMicros = req.GetAmountMicros()
		return resp, nil
	}
	out := int64(1_000)
	if llm.MaxOutputTokens != nil {
		out = llm.GetMaxOutputTokens()
	}
	known := llm.GetProvider() == "openai" && llm.GetModel() == "gpt-4o"
	var amount int64
	if known {
		amount = 2*llm.GetInputTokens() + 8*out
	}
	resp.Estimate = &runcapv1.LlmEstimate{
		Provider: llm.GetProvider(), Model: llm.GetModel(), InputTokens: llm.GetInputTokens(),
		EffectiveMaxOutputTokens: out, AmountMicros: amount, PriceTableVersion: testPriceTable,
	}
	switch {
	case !known:
		resp.Decision = runcapv1.Decision_DECISION_BLOCK
		resp.Reason = runcapv1.DecisionReason_DECISION_REASON_UNKNOWN_PRICE
	case amount > s.limit:
		resp.Decision = runcapv1.Decision_DECISION_BLOCK
		resp.Reason = runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET
	default:
		resp.AmountMicros = amount
	}
	return resp, nil
}

func (s *pricedStub) Commit(_ context.Context, req *runcapv1.CommitRequest, _ ...grpc.CallOption) (*runcapv1.CommitResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.commits = append(s.commits, req)
	actual := req.GetActualMicros()
	if u := req.GetUsage(); u != nil {
		actual = 2*u.GetInputTokens() + 8*u.GetOutputTokens()
	}
	return &runcapv1.CommitResponse{State: s.state(req.GetRunId()), ActualMicros: actual}, nil
}

func (s *pricedStub) Refund(_ context.Context, req *runcapv1.RefundRequest, _ ...grpc.CallOption) (*runcapv1.RefundResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refunds = append(s.refunds, req)
	return &runcapv1.RefundResponse{State: s.state(req.GetRunId())}, nil
}

var (
	gpt4o = LLMCall{Provider: "openai", Model: "gpt-4o", InputTokens: 1_200, MaxOutputTokens: 500}
	usage = TokenUsage{InputTokens: 1_100, OutputTokens: 310, CacheReadTokens: 100}
)

func TestLLMCallAndTokenUsageProtos(t *testing.T) {
	want := &runcapv1.LlmCall{Provider: "openai", Model: "gpt-4o", InputTokens: 1_200, MaxOutputTokens: proto.Int64(500)}
	if got := gpt4o.Proto(); !proto.Equal(got, want) {
		t.Fatalf("LLMCall.Proto() = %v, want %v", got, want)
	}
	if got := (LLMCall{Provider: "openai", Model: "gpt-4o"}).Proto(); got.MaxOutputTokens != nil {
		t.Fatalf("a zero MaxOutputTokens must stay unset (the server's default): %v", got)
	}
	wantUsage := &runcapv1.TokenUsage{InputTokens: 1, OutputTokens: 2, CacheReadTokens: 3, CacheWriteTokens: 4, ReasoningTokens: 5}
	if got := (TokenUsage{1, 2, 3, 4, 5}).Proto(); !proto.Equal(got, wantUsage) {
		t.Fatalf("TokenUsage.Proto() = %v, want %v", got, wantUsage)
	}
}

func TestReserveLLMAndCommitUsage(t *testing.T) {
	ctx := context.Background()
	stub := newPricedStub()
	c := newClient(stub, newConfig(nil))

	resp, err := c.ReserveLLM(ctx, "run-1", gpt4o, TTL(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetAmountMicros() != 2*1_200+8*500 || resp.GetEstimate().GetEffectiveMaxOutputTokens() != 500 {
		t.Fatalf("ReserveLLM: %v", resp)
	}
	committed, err := c.CommitUsage(ctx, "run-1", resp.GetReservationId(), usage)
	if err != nil || committed.GetActualMicros() != 2*1_100+8*310 {
		t.Fatalf("CommitUsage: %v, %v", committed, err)
	}
	if _, err := c.Reserve(ctx, "run-1", 40, ReservationID("res-amount")); err != nil {
		t.Fatal(err)
	}

	reserve := stub.reserves[0]
	if len(reserve.GetReservationId()) != 32 || reserve.GetTtl().AsDuration() != 30*time.Second {
		t.Fatalf("ReserveLLM request: %v", reserve)
	}
	if !proto.Equal(reserve.GetLlmCall(), gpt4o.Proto()) {
		t.Fatalf("llm_call = %v", reserve.GetLlmCall())
	}
	if amount, ok := stub.reserves[1].GetEstimate().(*runcapv1.ReserveRequest_AmountMicros); !ok || amount.AmountMicros != 40 {
		t.Fatalf("Reserve must still send amount_micros: %v", stub.reserves[1])
	}
	want := &runcapv1.CommitRequest{
		RunId: "run-1", ReservationId: resp.GetReservationId(),
		Actual: &runcapv1.CommitRequest_Usage{Usage: usage.Proto()},
	}
	if !proto.Equal(stub.commits[0], want) {
		t.Fatalf("CommitUsage request = %v, want %v", stub.commits[0], want)
	}
}

func TestWithLLMReservationSettles(t *testing.T) {
	ctx := context.Background()
	errCall := errors.New("the model call failed")
	for _, tc := range []struct {
		name       string
		fn         func(h *Hold) error
		wantErr    error
		wantUsage  *TokenUsage // committed with usage
		wantActual int64       // committed with micros, when wantUsage is nil and > 0
		wantRefund bool
	}{
		{name: "SetUsage commits the usage", fn: func(h *Hold) error { h.SetUsage(usage); return nil }, wantUsage: &usage},
		{name: "an error after SetUsage commits the usage", fn: func(h *Hold) error { h.SetUsage(usage); return errCall }, wantErr: errCall, wantUsage: &usage},
		{name: "SetActual replaces SetUsage", fn: func(h *Hold) error { h.SetUsage(usage); h.SetActual(123); return nil }, wantActual: 123},
		{name: "SetUsage replaces SetActual", fn: func(h *Hold) error { h.SetActual(123); h.SetUsage(usage); return nil }, wantUsage: &usage},
		{name: "Release drops SetUsage", fn: func(h *Hold) error { h.SetUsage(usage); h.Release(); return nil }, wantRefund: true},
		{name: "an error refunds", fn: func(*Hold) error { return errCall }, wantErr: errCall, wantRefund: true},
		{name: "nothing set commits the whole estimate", fn: func(*Hold) error { return nil }, wantActual: 6_400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stub := newPricedStub()
			c := newClient(stub, newConfig(nil))
			var hold *Hold
			err := c.WithLLMReservation(ctx, "run-1", gpt4o, func(_ context.Context, h *Hold) error {
				hold = h
				if h.Estimate().GetPriceTableVersion() != testPriceTable || h.AmountMicros() != 6_400 {
					t.Errorf("estimate %v, amount %d", h.Estimate(), h.AmountMicros())
				}
				return tc.fn(h)
			}, ReservationID("res-1"))
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantRefund {
				if len(stub.refunds) != 1 || len(stub.commits) != 0 {
					t.Fatalf("want one refund: %v %v", stub.refunds, stub.commits)
				}
				return
			}
			if len(stub.commits) != 1 || len(stub.refunds) != 0 {
				t.Fatalf("want one commit: %v %v", stub.commits, stub.refunds)
			}
			commit := stub.commits[0]
			if commit.GetReservationId() != "res-1" {
				t.Fatalf("commit %v", commit)
			}
			if tc.wantUsage != nil {
				if !proto.Equal(commit.GetUsage(), tc.wantUsage.Proto()) {
					t.Fatalf("commit %v, want usage %v", commit, tc.wantUsage)
				}
				if got, ok := hold.Usage(); !ok || got != *tc.wantUsage {
					t.Fatalf("Usage() = %v, %v", got, ok)
				}
				if _, ok := hold.ActualMicros(); ok {
					t.Fatal("ActualMicros must be unset after SetUsage")
				}
				if hold.CommitResponse().GetActualMicros() != 2*1_100+8*310 {
					t.Fatalf("commit response %v", hold.CommitResponse())
				}
				return
			}
			if a, ok := commit.GetActual().(*runcapv1.CommitRequest_ActualMicros); !ok || a.ActualMicros != tc.wantActual {
				t.Fatalf("commit %v, want actual %d", commit, tc.wantActual)
			}
			if _, ok := hold.Usage(); ok {
				t.Fatal("Usage must be unset")
			}
		})
	}
}

func TestHoldLLMCommitUsage(t *testing.T) {
	ctx := context.Background()
	stub := newPricedStub()
	c := newClient(stub, newConfig(nil))
	h, err := c.HoldLLM(ctx, "run-1", gpt4o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.CommitUsage(ctx, usage); err != nil {
		t.Fatal(err)
	}
	if h.CommitResponse() == nil || !proto.Equal(stub.commits[0].GetUsage(), usage.Proto()) {
		t.Fatalf("commit %v", stub.commits)
	}
	if h.State().GetRunId() != "run-1" {
		t.Fatalf("state %v", h.State())
	}
}

func TestUnknownPriceIsATypedBlock(t *testing.T) {
	ctx := context.Background()
	stub := newPricedStub()
	c := newClient(stub, newConfig(nil))
	called := false
	err := c.WithLLMReservation(ctx, "run-1", LLMCall{Provider: "openai", Model: "gpt-9-turbo", InputTokens: 10},
		func(context.Context, *Hold) error { called = true; return nil })
	if called {
		t.Fatal("fn must not run on a block")
	}
	if !errors.Is(err, ErrBudgetBlocked) || !errors.Is(err, ErrUnknownPrice) {
		t.Fatalf("want a block by an unknown price, got %v", err)
	}
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) || !blocked.UnknownPrice() {
		t.Fatalf("%v", err)
	}
	if est := blocked.Estimate(); est.GetModel() != "gpt-9-turbo" || est.GetAmountMicros() != 0 {
		t.Fatalf("estimate %v", est)
	}
	msg := err.Error()
	for _, want := range []string{
		"DECISION_REASON_UNKNOWN_PRICE",
		"unknown price",
		`no price for model "gpt-9-turbo" of provider "openai" (price table "test-prices-1")`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "micros remain") {
		t.Errorf("message %q talks of the budget", msg)
	}
	if len(stub.commits)+len(stub.refunds) != 0 {
		t.Fatal("nothing is held, so nothing is settled")
	}

	// No estimate (not expected from the server): still clear.
	bare := &BudgetBlockedError{RunID: "run-1", Response: &runcapv1.ReserveResponse{
		Decision: runcapv1.Decision_DECISION_BLOCK, Reason: runcapv1.DecisionReason_DECISION_REASON_UNKNOWN_PRICE,
	}}
	if !strings.Contains(bare.Error(), "unknown price: the server has no price for the model") {
		t.Fatalf("message %q", bare.Error())
	}
}

func TestBudgetBlockOfAnLLMCallNamesTheEstimate(t *testing.T) {
	stub := newPricedStub()
	stub.limit = 1_000
	c := newClient(stub, newConfig(nil))
	_, err := c.HoldLLM(context.Background(), "run-1", gpt4o)
	if !errors.Is(err, ErrBudgetBlocked) || errors.Is(err, ErrUnknownPrice) {
		t.Fatalf("want a budget block, got %v", err)
	}
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) || blocked.UnknownPrice() || blocked.Estimate().GetAmountMicros() != 6_400 {
		t.Fatalf("%v", err)
	}
	if !strings.Contains(err.Error(), "1000 of 1000 micros remain, the openai/gpt-4o call was estimated at 6400 micros") {
		t.Fatalf("message %q", err)
	}
	plain := &BudgetBlockedError{RunID: "run-1", Response: &runcapv1.ReserveResponse{
		Decision: runcapv1.Decision_DECISION_BLOCK, Reason: runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
	}}
	if plain.Estimate() != nil || strings.Contains(plain.Error(), "estimated") {
		t.Fatalf("%v", plain)
	}
}
