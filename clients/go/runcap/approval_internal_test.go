package runcap

import (
	"context"
	"errors"
	"fmt"
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

const (
	spendApproval  = "run-1/approval:spend"
	deployApproval = "run-1/approval:meter:tool:deploy"
)

// spendNeedsApprovalAnswer is a call that would bring the run's spend past
// its ApprovalPercent: nothing held.
func spendNeedsApprovalAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_APPROVAL_REQUIRED,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_SPEND_NEEDS_APPROVAL,
		ReservationId:     req.GetReservationId(),
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_SPEND,
		State:             &runcapv1.BudgetState{LimitMicros: 10_000, RemainingMicros: 2_500},
		DecisionId:        "dec-approval",
		ApprovalId:        spendApproval,
	}
}

// meterNeedsApprovalAnswer is a call on a meter not on the run's
// ApprovedMeters: nothing held.
func meterNeedsApprovalAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_APPROVAL_REQUIRED,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_METER_NEEDS_APPROVAL,
		ReservationId:     req.GetReservationId(),
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_METER,
		BlockingMeter:     req.GetMeter(),
		ApprovalId:        req.GetRunId() + "/approval:meter:" + req.GetMeter(),
	}
}

// approvalDeniedAnswer is a call whose escalation was denied: a block.
func approvalDeniedAnswer(req *runcapv1.ReserveRequest) *runcapv1.ReserveResponse {
	return &runcapv1.ReserveResponse{
		Decision:          runcapv1.Decision_DECISION_BLOCK,
		Reason:            runcapv1.DecisionReason_DECISION_REASON_APPROVAL_DENIED,
		ReservationId:     req.GetReservationId(),
		BlockingDimension: runcapv1.BudgetDimension_BUDGET_DIMENSION_METER,
		BlockingMeter:     req.GetMeter(),
		ApprovalId:        deployApproval,
	}
}

func TestCreateRunSendsTheEscalationTriggers(t *testing.T) {
	stub := &policyStub{}
	c := newClient(stub, newConfig(nil))
	policy := &runcapv1.RunPolicy{ApprovalPercent: 80, ApprovedMeters: []string{"tool:search"}}
	if _, err := c.CreateRun(context.Background(), "run-1", 10_000, Policy(policy)); err != nil {
		t.Fatal(err)
	}
	policy.ApprovedMeters[0] = "tool:deploy" // the option copied it
	want := &runcapv1.RunPolicy{ApprovalPercent: 80, ApprovedMeters: []string{"tool:search"}}
	if sent := stub.creates[0].GetPolicy(); !proto.Equal(sent, want) {
		t.Fatalf("CreateRun sent %v, want %v", sent, want)
	}
}

func TestApprovalRequiredIsATypedErrorWithTheApprovalID(t *testing.T) {
	ctx := context.Background()
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{
		spendNeedsApprovalAnswer, spendNeedsApprovalAnswer,
	}}
	c := newClient(stub, newConfig(nil))

	_, err := c.Hold(ctx, "run-1", 4_000)
	var pending *ApprovalRequiredError
	if !errors.As(err, &pending) {
		t.Fatalf("want an *ApprovalRequiredError, got %T %v", err, err)
	}
	if pending.ApprovalID() != spendApproval || pending.DecisionID() != "dec-approval" ||
		pending.Reason() != runcapv1.DecisionReason_DECISION_REASON_SPEND_NEEDS_APPROVAL || pending.RunID != "run-1" ||
		pending.ApprovalDenied() {
		t.Fatalf("pending: %v", pending.Response)
	}
	if !errors.Is(err, ErrApprovalRequired) || !errors.Is(err, ErrBudgetBlocked) ||
		errors.Is(err, ErrBudgetThrottled) || errors.Is(err, ErrUnknownPrice) {
		t.Fatalf("errors.Is on %v", err)
	}
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) || blocked.Response != pending.Response || blocked.ApprovalID() != spendApproval {
		t.Fatalf("errors.As must find it as a *BudgetBlockedError: %v", blocked)
	}
	var throttled *BudgetThrottledError
	if errors.As(err, &throttled) {
		t.Fatal("an escalation is not a throttle")
	}
	if runcaperr.FromError(err) != nil {
		t.Fatal("an escalation is not a *runcaperr.Error")
	}
	msg := err.Error()
	for _, want := range []string{
		"needs approval (DECISION_REASON_SPEND_NEEDS_APPROVAL)",
		"would pass its approval threshold",
		`approve "run-1/approval:spend", then reserve again with a new reservation id`,
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}

	called := false
	err = c.WithReservation(ctx, "run-1", 4_000, func(context.Context, *Hold) error { called = true; return nil })
	if !errors.As(err, &pending) || called {
		t.Fatalf("WithReservation: %v (called %v)", err, called)
	}
	if len(stub.commits) != 0 || len(stub.refunds) != 0 {
		t.Fatalf("an escalation holds nothing to settle: commits %v, refunds %v", stub.commits, stub.refunds)
	}
	// Wrapped, it still matches.
	if wrapped := fmt.Errorf("agent step: %w", err); !errors.Is(wrapped, ErrApprovalRequired) || !errors.As(wrapped, &blocked) {
		t.Fatalf("wrapped: %v", wrapped)
	}
}

func TestAMeterThatNeedsApprovalNamesTheMeter(t *testing.T) {
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{meterNeedsApprovalAnswer}}
	c := newClient(stub, newConfig(nil))
	_, err := c.HoldLLM(context.Background(), "run-1", capableCall, Meter("tool:deploy"))
	var pending *ApprovalRequiredError
	if !errors.As(err, &pending) {
		t.Fatalf("want an *ApprovalRequiredError, got %T %v", err, err)
	}
	if pending.ApprovalID() != deployApproval || pending.Meter() != "tool:deploy" ||
		pending.Dimension() != runcapv1.BudgetDimension_BUDGET_DIMENSION_METER {
		t.Fatalf("pending: %v", pending.Response)
	}
	if msg := err.Error(); !strings.Contains(msg, `meter "tool:deploy" is not on the run's approved meters`) {
		t.Fatalf("message %q", msg)
	}
	if stub.reserves[0].GetMeter() != "tool:deploy" {
		t.Fatalf("reserve sent %v", stub.reserves[0])
	}
}

func TestReserveReturnsApprovalRequiredAsAResponse(t *testing.T) {
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{spendNeedsApprovalAnswer}}
	c := newClient(stub, newConfig(nil))
	resp, err := c.Reserve(context.Background(), "run-1", 4_000)
	if err != nil || resp.GetDecision() != runcapv1.Decision_DECISION_APPROVAL_REQUIRED || resp.GetApprovalId() != spendApproval {
		t.Fatalf("Reserve: %v, %v", resp, err)
	}
}

func TestADeniedApprovalBlocksWithItsApprovalID(t *testing.T) {
	stub := &policyStub{answers: []func(*runcapv1.ReserveRequest) *runcapv1.ReserveResponse{approvalDeniedAnswer}}
	c := newClient(stub, newConfig(nil))
	_, err := c.Hold(context.Background(), "run-1", 40, Meter("tool:deploy"))
	var blocked *BudgetBlockedError
	if !errors.As(err, &blocked) {
		t.Fatalf("want a *BudgetBlockedError, got %T %v", err, err)
	}
	var pending *ApprovalRequiredError
	if errors.As(err, &pending) || errors.Is(err, ErrApprovalRequired) {
		t.Fatalf("a denied approval is a block, not an escalation: %v", err)
	}
	if !blocked.ApprovalDenied() || blocked.ApprovalID() != deployApproval {
		t.Fatalf("blocked: %v", blocked.Response)
	}
	if msg := err.Error(); !strings.Contains(msg, `the call needs approval "run-1/approval:meter:tool:deploy", which was denied`) {
		t.Fatalf("message %q", msg)
	}
	plain := &BudgetBlockedError{RunID: "run-1", Response: &runcapv1.ReserveResponse{
		Decision: runcapv1.Decision_DECISION_BLOCK, Reason: runcapv1.DecisionReason_DECISION_REASON_INSUFFICIENT_BUDGET,
	}}
	if plain.ApprovalID() != "" || plain.ApprovalDenied() || strings.Contains(plain.Error(), "approv") {
		t.Fatalf("a plain block: %q", plain.Error())
	}
}

// approvalStub resolves the approvals it knows (a replay when already
// resolved the same way, APPROVAL_RESOLVED the other way) after failing the
// first calls with the errors queued in fail, and answers APPROVAL_NOT_FOUND
// for any other id. Any other call panics.
type approvalStub struct {
	runcapv1.BudgetServiceClient
	mu        sync.Mutex
	approves  []*runcapv1.ApproveRequest
	denies    []*runcapv1.DenyRequest
	fail      []error
	approvals map[string]runcapv1.ApprovalStatus
}

func (s *approvalStub) resolve(id string, want runcapv1.ApprovalStatus) (*runcapv1.Approval, bool, error) {
	if len(s.fail) > 0 {
		err := s.fail[0]
		s.fail = s.fail[1:]
		return nil, false, err
	}
	current, ok := s.approvals[id]
	if !ok {
		st, err := status.New(codes.NotFound, "there is no approval "+id).WithDetails(
			&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "APPROVAL_NOT_FOUND"},
			&errdetails.ResourceInfo{ResourceType: "runcap.v1.Approval", ResourceName: id},
		)
		if err != nil {
			panic(err)
		}
		return nil, false, st.Err()
	}
	if current != runcapv1.ApprovalStatus_APPROVAL_STATUS_PENDING && current != want {
		st, err := status.New(codes.FailedPrecondition, "approval "+id+" is already "+current.String()).WithDetails(
			&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "APPROVAL_RESOLVED",
				Metadata: map[string]string{"run_id": "run-1", "reservation_id": ""}},
			&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
				{Type: "APPROVAL_RESOLVED", Subject: id},
			}},
		)
		if err != nil {
			panic(err)
		}
		return nil, false, st.Err()
	}
	s.approvals[id] = want
	return &runcapv1.Approval{ApprovalId: id, Status: want}, current == want, nil
}

func (s *approvalStub) Approve(_ context.Context, req *runcapv1.ApproveRequest, _ ...grpc.CallOption) (*runcapv1.ApproveResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.approves = append(s.approves, req)
	approval, replayed, err := s.resolve(req.GetApprovalId(), runcapv1.ApprovalStatus_APPROVAL_STATUS_APPROVED)
	if err != nil {
		return nil, err
	}
	return &runcapv1.ApproveResponse{Approval: approval, State: &runcapv1.BudgetState{RunId: "run-1"}, Replayed: replayed}, nil
}

func (s *approvalStub) Deny(_ context.Context, req *runcapv1.DenyRequest, _ ...grpc.CallOption) (*runcapv1.DenyResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.denies = append(s.denies, req)
	approval, replayed, err := s.resolve(req.GetApprovalId(), runcapv1.ApprovalStatus_APPROVAL_STATUS_DENIED)
	if err != nil {
		return nil, err
	}
	return &runcapv1.DenyResponse{Approval: approval, State: &runcapv1.BudgetState{RunId: "run-1"}, Replayed: replayed}, nil
}

func TestApproveSendsTheIDAndRetriesUnavailable(t *testing.T) {
	ctx := context.Background()
	stub := &approvalStub{
		approvals: map[string]runcapv1.ApprovalStatus{spendApproval: runcapv1.ApprovalStatus_APPROVAL_STATUS_PENDING},
		fail: []error{
			statusError(t, codes.Unavailable, "SHUTTING_DOWN"),
			status.Error(codes.Unavailable, "connection refused"),
		},
	}
	c := newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))
	resp, err := c.Approve(ctx, spendApproval)
	if err != nil || resp.GetApproval().GetStatus() != runcapv1.ApprovalStatus_APPROVAL_STATUS_APPROVED ||
		resp.GetApproval().GetApprovalId() != spendApproval || resp.GetReplayed() || resp.GetState().GetRunId() != "run-1" {
		t.Fatalf("Approve: %v, %v", resp, err)
	}
	if len(stub.approves) != 3 {
		t.Fatalf("%d attempts, want 3 (Approve is idempotent, so retried)", len(stub.approves))
	}
	for _, req := range stub.approves {
		if !proto.Equal(req, &runcapv1.ApproveRequest{ApprovalId: spendApproval}) {
			t.Fatalf("request %v", req)
		}
	}
	// Approving again is a replay.
	if again, err := c.Approve(ctx, spendApproval); err != nil || !again.GetReplayed() {
		t.Fatalf("second Approve: %v, %v", again, err)
	}
	if len(stub.denies) != 0 {
		t.Fatalf("denies %v", stub.denies)
	}
}

func TestDenySendsTheIDAndRetriesUnavailable(t *testing.T) {
	ctx := context.Background()
	stub := &approvalStub{
		approvals: map[string]runcapv1.ApprovalStatus{deployApproval: runcapv1.ApprovalStatus_APPROVAL_STATUS_PENDING},
		fail:      []error{statusError(t, codes.Unavailable, "BACKEND_UNAVAILABLE")},
	}
	c := newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))
	resp, err := c.Deny(ctx, deployApproval)
	if err != nil || resp.GetApproval().GetStatus() != runcapv1.ApprovalStatus_APPROVAL_STATUS_DENIED || resp.GetReplayed() {
		t.Fatalf("Deny: %v, %v", resp, err)
	}
	if len(stub.denies) != 2 || !proto.Equal(stub.denies[1], &runcapv1.DenyRequest{ApprovalId: deployApproval}) {
		t.Fatalf("denies %v, want 2 attempts", stub.denies)
	}
	if again, err := c.Deny(ctx, deployApproval); err != nil || !again.GetReplayed() {
		t.Fatalf("second Deny: %v, %v", again, err)
	}
	if len(stub.approves) != 0 {
		t.Fatalf("approves %v", stub.approves)
	}
}

func TestApprovalErrorsAreTypedAndFinal(t *testing.T) {
	ctx := context.Background()
	stub := &approvalStub{approvals: map[string]runcapv1.ApprovalStatus{
		spendApproval:  runcapv1.ApprovalStatus_APPROVAL_STATUS_DENIED,
		deployApproval: runcapv1.ApprovalStatus_APPROVAL_STATUS_APPROVED,
	}}
	c := newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))

	_, err := c.Approve(ctx, "run-1/approval:gone")
	if !runcaperr.IsApprovalNotFound(err) || !errors.Is(err, runcaperr.ErrApprovalNotFound) || runcaperr.IsDecisionNotFound(err) {
		t.Fatalf("Approve of an unknown approval: %v", err)
	}
	if e := runcaperr.FromError(err); e.Resource == nil || e.Resource.Name != "run-1/approval:gone" {
		t.Fatalf("%+v", e)
	}
	_, err = c.Deny(ctx, "run-1/approval:gone")
	if !runcaperr.IsApprovalNotFound(err) {
		t.Fatalf("Deny of an unknown approval: %v", err)
	}

	_, err = c.Approve(ctx, spendApproval)
	if !runcaperr.IsApprovalResolved(err) || !errors.Is(err, runcaperr.ErrApprovalResolved) || runcaperr.IsApprovalNotFound(err) {
		t.Fatalf("Approve of a denied approval: %v", err)
	}
	if e := runcaperr.FromError(err); len(e.PreconditionViolations) != 1 || e.PreconditionViolations[0].Subject != spendApproval {
		t.Fatalf("%+v", e)
	}
	_, err = c.Deny(ctx, deployApproval)
	if !runcaperr.IsApprovalResolved(err) {
		t.Fatalf("Deny of an approved approval: %v", err)
	}
	// Final: none of them was retried.
	if len(stub.approves) != 2 || len(stub.denies) != 2 {
		t.Fatalf("%d approves, %d denies, want 2 of each", len(stub.approves), len(stub.denies))
	}
}
