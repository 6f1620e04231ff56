package runcap

import (
	"context"
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

// recordingStub records the requests of the calls it implements; any other
// call panics (the embedded interface is nil). SetScopePolicy first fails
// with the errors queued in fail. No server is involved.
type recordingStub struct {
	runcapv1.BudgetServiceClient
	requests []proto.Message
	reserve  *runcapv1.ReserveResponse
	fail     []error
}

func (s *recordingStub) CreateRun(_ context.Context, req *runcapv1.CreateRunRequest, _ ...grpc.CallOption) (*runcapv1.CreateRunResponse, error) {
	s.requests = append(s.requests, req)
	return &runcapv1.CreateRunResponse{Run: &runcapv1.Run{RunId: req.GetRunId(), ParentRunId: req.GetParentRunId()}}, nil
}

func (s *recordingStub) SetScopeLimit(_ context.Context, req *runcapv1.SetScopeLimitRequest, _ ...grpc.CallOption) (*runcapv1.SetScopeLimitResponse, error) {
	s.requests = append(s.requests, req)
	return &runcapv1.SetScopeLimitResponse{Scope: &runcapv1.Scope{Ref: req.GetScope()}}, nil
}

func (s *recordingStub) SetScopePolicy(_ context.Context, req *runcapv1.SetScopePolicyRequest, _ ...grpc.CallOption) (*runcapv1.SetScopePolicyResponse, error) {
	s.requests = append(s.requests, req)
	if len(s.fail) > 0 {
		err := s.fail[0]
		s.fail = s.fail[1:]
		return nil, err
	}
	return &runcapv1.SetScopePolicyResponse{Scope: &runcapv1.Scope{Ref: req.GetScope(), DefaultPolicy: req.GetPolicy()}}, nil
}

func (s *recordingStub) GetScope(_ context.Context, req *runcapv1.GetScopeRequest, _ ...grpc.CallOption) (*runcapv1.GetScopeResponse, error) {
	s.requests = append(s.requests, req)
	return &runcapv1.GetScopeResponse{Scope: &runcapv1.Scope{Ref: req.GetScope()}}, nil
}

func (s *recordingStub) Reserve(_ context.Context, req *runcapv1.ReserveRequest, _ ...grpc.CallOption) (*runcapv1.ReserveResponse, error) {
	s.requests = append(s.requests, req)
	return s.reserve, nil
}

func TestParentScopeRequests(t *testing.T) {
	ctx := context.Background()
	stub := &recordingStub{}
	c := newClient(stub, newConfig(nil))
	team := &runcapv1.ScopeRef{Kind: runcapv1.ScopeKind_SCOPE_KIND_TEAM, Id: "team-7"}

	if _, err := c.CreateRun(ctx, "child", 5, ParentRunID("root"), APIKeyID("key-1"), UserID("ada"), TeamID("team-7")); err != nil {
		t.Fatal(err)
	}
	set, err := c.SetScopeLimit(ctx, runcapv1.ScopeKind_SCOPE_KIND_TEAM, "team-7", runcapv1.Period_PERIOD_DAILY, 50_000_000)
	if err != nil || !proto.Equal(set.GetScope().GetRef(), team) {
		t.Fatalf("SetScopeLimit: %v, %v", set, err)
	}
	if _, err := c.ClearScopeLimit(ctx, runcapv1.ScopeKind_SCOPE_KIND_TEAM, "team-7", runcapv1.Period_PERIOD_MONTHLY); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetScope(ctx, runcapv1.ScopeKind_SCOPE_KIND_TEAM, "team-7")
	if err != nil || !proto.Equal(got.GetScope().GetRef(), team) {
		t.Fatalf("GetScope: %v, %v", got, err)
	}

	want := []proto.Message{
		&runcapv1.CreateRunRequest{RunId: "child", LimitMicros: 5, ParentRunId: "root", ApiKeyId: "key-1", UserId: "ada", TeamId: "team-7"},
		&runcapv1.SetScopeLimitRequest{Scope: team, Period: runcapv1.Period_PERIOD_DAILY,
			Ceiling: &runcapv1.SetScopeLimitRequest_LimitMicros{LimitMicros: 50_000_000}},
		&runcapv1.SetScopeLimitRequest{Scope: team, Period: runcapv1.Period_PERIOD_MONTHLY,
			Ceiling: &runcapv1.SetScopeLimitRequest_Clear{Clear: true}},
		&runcapv1.GetScopeRequest{Scope: team},
	}
	if len(stub.requests) != len(want) {
		t.Fatalf("%d requests, want %d", len(stub.requests), len(want))
	}
	for i := range want {
		if !proto.Equal(stub.requests[i], want[i]) {
			t.Errorf("request %d = %v, want %v", i, stub.requests[i], want[i])
		}
	}
}

func TestBudgetBlockedErrorNamesTheBlockingScope(t *testing.T) {
	stub := &recordingStub{reserve: &runcapv1.ReserveResponse{
		Decision:       runcapv1.Decision_DECISION_BLOCK,
		Reason:         runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
		State:          &runcapv1.BudgetState{RunId: "run-1", LimitMicros: 1000, RemainingMicros: 1000},
		BlockingScope:  &runcapv1.ScopeRef{Kind: runcapv1.ScopeKind_SCOPE_KIND_USER, Id: "ada"},
		BlockingPeriod: runcapv1.Period_PERIOD_MONTHLY,
	}}
	c := newClient(stub, newConfig(nil))
	_, err := c.Hold(context.Background(), "run-1", 10)
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) {
		t.Fatalf("want a *BudgetBlockedError, got %v", err)
	}
	if blocked.BlockingScope().GetId() != "ada" || blocked.BlockingPeriod() != runcapv1.Period_PERIOD_MONTHLY {
		t.Fatalf("%v %v", blocked.BlockingScope(), blocked.BlockingPeriod())
	}
	if !strings.Contains(err.Error(), `blocked by SCOPE_KIND_USER "ada", PERIOD_MONTHLY`) {
		t.Fatalf("message %q", err)
	}

	// The run's own ceiling, or an older server that does not say: no suffix.
	stub.reserve.BlockingScope = &runcapv1.ScopeRef{Kind: runcapv1.ScopeKind_SCOPE_KIND_RUN, Id: "run-1"}
	if _, err := c.Hold(context.Background(), "run-1", 10); err == nil || strings.Contains(err.Error(), "blocked by") {
		t.Fatalf("message %v", err)
	}
	stub.reserve.BlockingScope = nil
	if _, err := c.Hold(context.Background(), "run-1", 10); err == nil || strings.Contains(err.Error(), "blocked by") {
		t.Fatalf("message %v", err)
	}
}

func TestScopePolicyRequests(t *testing.T) {
	ctx := context.Background()
	stub := &recordingStub{}
	c := newClient(stub, newConfig(nil))
	team := &runcapv1.ScopeRef{Kind: runcapv1.ScopeKind_SCOPE_KIND_TEAM, Id: "team-7"}
	policy := &runcapv1.RunPolicy{
		EnforcementMode: runcapv1.EnforcementMode_ENFORCEMENT_MODE_ADVISORY,
		MaxInFlight:     proto.Int32(4),
		MeterLimits:     map[string]int64{"tool:serp_api": 50},
	}
	want := proto.Clone(policy).(*runcapv1.RunPolicy)

	set, err := c.SetScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_TEAM, "team-7", policy)
	if err != nil || !proto.Equal(set.GetScope().GetRef(), team) || !proto.Equal(set.GetScope().GetDefaultPolicy(), want) {
		t.Fatalf("SetScopePolicy: %v, %v", set, err)
	}
	policy.MaxInFlight = proto.Int32(99) // the call copied it
	cleared, err := c.ClearScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_TEAM, "team-7")
	if err != nil || cleared.GetScope().GetDefaultPolicy() != nil {
		t.Fatalf("ClearScopePolicy: %v, %v", cleared, err)
	}
	// An empty policy (every field the server's default) is a policy, not a clear.
	if _, err := c.SetScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_USER, "ada", &runcapv1.RunPolicy{}); err != nil {
		t.Fatal(err)
	}
	// A nil policy is refused before any call.
	if _, err := c.SetScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_USER, "ada", nil); err == nil || !strings.Contains(err.Error(), "ClearScopePolicy") {
		t.Fatalf("SetScopePolicy(nil): %v", err)
	}

	wantRequests := []proto.Message{
		&runcapv1.SetScopePolicyRequest{Scope: team, Default: &runcapv1.SetScopePolicyRequest_Policy{Policy: want}},
		&runcapv1.SetScopePolicyRequest{Scope: team, Default: &runcapv1.SetScopePolicyRequest_Clear{Clear: true}},
		&runcapv1.SetScopePolicyRequest{Scope: &runcapv1.ScopeRef{Kind: runcapv1.ScopeKind_SCOPE_KIND_USER, Id: "ada"},
			Default: &runcapv1.SetScopePolicyRequest_Policy{Policy: &runcapv1.RunPolicy{}}},
	}
	if len(stub.requests) != len(wantRequests) {
		t.Fatalf("%d requests, want %d", len(stub.requests), len(wantRequests))
	}
	for i := range wantRequests {
		if !proto.Equal(stub.requests[i], wantRequests[i]) {
			t.Errorf("request %d = %v, want %v", i, stub.requests[i], wantRequests[i])
		}
	}
}

func TestSetScopePolicyRetriesUnavailable(t *testing.T) {
	ctx := context.Background()
	stub := &recordingStub{fail: []error{
		statusError(t, codes.Unavailable, "SHUTTING_DOWN"),
		status.Error(codes.Unavailable, "connection refused"),
	}}
	c := newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))
	policy := &runcapv1.RunPolicy{MaxTokens: proto.Int64(100_000)}
	key := &runcapv1.ScopeRef{Kind: runcapv1.ScopeKind_SCOPE_KIND_API_KEY, Id: "key-1"}
	if _, err := c.SetScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_API_KEY, "key-1", policy); err != nil {
		t.Fatal(err)
	}
	want := &runcapv1.SetScopePolicyRequest{Scope: key, Default: &runcapv1.SetScopePolicyRequest_Policy{Policy: policy}}
	if len(stub.requests) != 3 {
		t.Fatalf("%d attempts, want 3 (SetScopePolicy is idempotent, so retried)", len(stub.requests))
	}
	for _, req := range stub.requests {
		if !proto.Equal(req, want) {
			t.Fatalf("request %v, want %v", req, want)
		}
	}

	stub.requests = nil
	for range 10 {
		stub.fail = append(stub.fail, status.Error(codes.Unavailable, "down"))
	}
	_, err := c.ClearScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_API_KEY, "key-1")
	if !runcaperr.IsUnavailable(err) || len(stub.requests) != fastRetry.MaxAttempts {
		t.Fatalf("ClearScopePolicy: %v after %d attempts, want UNAVAILABLE after %d", err, len(stub.requests), fastRetry.MaxAttempts)
	}

	stub.requests, stub.fail = nil, []error{statusError(t, codes.InvalidArgument, "INVALID_ARGUMENT")}
	if _, err := c.SetScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_API_KEY, "key-1", policy); !runcaperr.IsInvalidArgument(err) || len(stub.requests) != 1 {
		t.Fatalf("a final error: %v after %d attempts, want 1", err, len(stub.requests))
	}
}
