package runcap

import (
	"context"
	"errors"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

// recordingStub records the requests of the calls it implements; any other
// call panics (the embedded interface is nil). No server is involved.
type recordingStub struct {
	runcapv1.BudgetServiceClient
	requests []proto.Message
	reserve  *runcapv1.ReserveResponse
}

func (s *recordingStub) CreateRun(_ context.Context, req *runcapv1.CreateRunRequest, _ ...grpc.CallOption) (*runcapv1.CreateRunResponse, error) {
	s.requests = append(s.requests, req)
	return &runcapv1.CreateRunResponse{Run: &runcapv1.Run{RunId: req.GetRunId(), ParentRunId: req.GetParentRunId()}}, nil
}

func (s *recordingStub) SetScopeLimit(_ context.Context, req *runcapv1.SetScopeLimitRequest, _ ...grpc.CallOption) (*runcapv1.SetScopeLimitResponse, error) {
	s.requests = append(s.requests, req)
	return &runcapv1.SetScopeLimitResponse{Scope: &runcapv1.Scope{Ref: req.GetScope()}}, nil
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
