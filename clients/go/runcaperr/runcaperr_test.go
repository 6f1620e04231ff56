package runcaperr_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

func withDetails(t *testing.T, c codes.Code, msg string, details ...proto.Message) error {
	t.Helper()
	v1 := make([]protoadapt.MessageV1, len(details))
	for i, d := range details {
		v1[i] = protoadapt.MessageV1Of(d)
	}
	st, err := status.New(c, msg).WithDetails(v1...)
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

func TestUnavailableWithRetryDelay(t *testing.T) {
	err := withDetails(t, codes.Unavailable, "shutting down",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "SHUTTING_DOWN"},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(100 * time.Millisecond)},
	)
	wrapped := fmt.Errorf("calling runcap: %w", err)
	typed := fmt.Errorf("calling runcap: %w", runcaperr.FromError(err))
	if !runcaperr.IsUnavailable(wrapped) || !errors.Is(typed, runcaperr.ErrShuttingDown) ||
		!errors.Is(typed, runcaperr.ErrUnavailable) || errors.Is(typed, runcaperr.ErrBackendUnavailable) {
		t.Fatalf("predicates on %v", wrapped)
	}
	if d, ok := runcaperr.RetryDelay(wrapped); !ok || d != 100*time.Millisecond {
		t.Fatalf("RetryDelay = %v, %v", d, ok)
	}
	e := runcaperr.FromError(wrapped)
	if e.Reason != runcapv1.ErrorReason_ERROR_REASON_SHUTTING_DOWN || !e.Retryable() || len(e.Details) != 2 {
		t.Fatalf("%+v", e)
	}
	if got := e.Error(); got != "runcap: SHUTTING_DOWN (Unavailable): shutting down" {
		t.Fatalf("Error() = %q", got)
	}
	if status.Code(e) != codes.Unavailable {
		t.Fatalf("status.Code = %v", status.Code(e))
	}
}

func TestForeignErrorInfoMatchesByCodeOnly(t *testing.T) {
	err := withDetails(t, codes.NotFound, "no route",
		&errdetails.ErrorInfo{Domain: "proxy.example", Reason: "RUN_NOT_FOUND", Metadata: map[string]string{"k": "v"}})
	if !runcaperr.IsNotFound(err) || runcaperr.IsRunNotFound(err) {
		t.Fatalf("predicates on %v", err)
	}
	e := runcaperr.FromError(err)
	if e.Reason != runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED || e.ReasonName != "RUN_NOT_FOUND" || e.Domain != "proxy.example" || e.Metadata["k"] != "v" {
		t.Fatalf("%+v", e)
	}
	if _, ok := runcaperr.RetryDelay(err); ok {
		t.Fatal("RetryDelay without RetryInfo")
	}
}

func TestUnknownReasonAndBareStatus(t *testing.T) {
	err := withDetails(t, codes.Internal, "new",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "SOMETHING_NEWER"})
	if e := runcaperr.FromError(err); e.Reason != runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED || e.ReasonName != "SOMETHING_NEWER" || !runcaperr.IsInternal(err) {
		t.Fatalf("%+v", e)
	}
	bare := status.Error(codes.DeadlineExceeded, "too slow")
	if e := runcaperr.FromError(bare); e == nil || !errors.Is(e, context.DeadlineExceeded) || e.Error() != "runcap: DeadlineExceeded: too slow" {
		t.Fatalf("%v", e)
	}
}

func TestNilAndNonStatusErrors(t *testing.T) {
	if runcaperr.FromError(nil) != nil || runcaperr.FromError(errors.New("plain")) != nil || runcaperr.FromError(context.Canceled) != nil {
		t.Fatal("FromError of a non-status error must be nil")
	}
	if runcaperr.Code(nil) != codes.OK || runcaperr.Code(errors.New("plain")) != codes.Unknown {
		t.Fatal("Code")
	}
	if runcaperr.IsNotFound(nil) || runcaperr.Reason(nil) != runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED {
		t.Fatal("predicates on nil")
	}
}

func TestBadRequestAndPrecondition(t *testing.T) {
	err := withDetails(t, codes.InvalidArgument, "invalid request",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "INVALID_ARGUMENT"},
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "amount_micros", Description: "must be positive"},
		}})
	if v := runcaperr.FieldViolations(err); len(v) != 1 || v[0] != (runcaperr.FieldViolation{Field: "amount_micros", Description: "must be positive"}) {
		t.Fatalf("violations %v", v)
	}
	err = withDetails(t, codes.FailedPrecondition, "blocked",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "RESERVATION_BLOCKED"},
		&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
			{Type: "RESERVATION_BLOCKED", Subject: "run/res", Description: "blocked"},
		}})
	if !runcaperr.IsReservationBlocked(err) || runcaperr.IsReservationReleased(err) {
		t.Fatalf("%v", err)
	}
	if e := runcaperr.FromError(err); len(e.PreconditionViolations) != 1 || e.PreconditionViolations[0].Subject != "run/res" {
		t.Fatalf("%+v", e.PreconditionViolations)
	}
}

func TestParentRunErrors(t *testing.T) {
	missing := withDetails(t, codes.NotFound, "parent run missing",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "PARENT_RUN_NOT_FOUND",
			Metadata: map[string]string{"run_id": "child", "parent_run_id": "root"}},
		&errdetails.ResourceInfo{ResourceType: "runcap.v1.Run", ResourceName: "root"})
	if !runcaperr.IsParentRunNotFound(missing) || !runcaperr.IsNotFound(missing) || runcaperr.IsRunNotFound(missing) {
		t.Fatalf("%v", missing)
	}
	if e := runcaperr.FromError(missing); e.Metadata["parent_run_id"] != "root" || e.Resource == nil || e.Resource.Name != "root" {
		t.Fatalf("%+v", e)
	}
	closed := withDetails(t, codes.FailedPrecondition, "parent run closed",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "PARENT_RUN_CLOSED"},
		&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
			{Type: "PARENT_RUN_CLOSED", Subject: "root", Description: "closed"},
		}})
	if !runcaperr.IsParentRunClosed(closed) || !errors.Is(runcaperr.FromError(closed), runcaperr.ErrParentRunClosed) ||
		runcaperr.IsParentRunNotFound(closed) || runcaperr.IsReservationBlocked(closed) {
		t.Fatalf("%v", closed)
	}
}

func TestRunClosedError(t *testing.T) {
	closed := withDetails(t, codes.FailedPrecondition, "run closed",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "RUN_CLOSED",
			Metadata: map[string]string{"run_id": "run-1"}},
		&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
			{Type: "RUN_CLOSED", Subject: "run-1", Description: "closed"},
		}})
	wrapped := fmt.Errorf("suspending: %w", closed)
	if !runcaperr.IsRunClosed(wrapped) || !runcaperr.IsFailedPrecondition(wrapped) ||
		!errors.Is(runcaperr.FromError(wrapped), runcaperr.ErrRunClosed) ||
		runcaperr.IsParentRunClosed(wrapped) || runcaperr.IsReservationBlocked(wrapped) {
		t.Fatalf("predicates on %v", wrapped)
	}
	e := runcaperr.FromError(wrapped)
	if e.Reason != runcapv1.ErrorReason_ERROR_REASON_RUN_CLOSED || e.Metadata["run_id"] != "run-1" ||
		len(e.PreconditionViolations) != 1 || e.PreconditionViolations[0].Subject != "run-1" || e.Retryable() {
		t.Fatalf("%+v", e)
	}
	if got := e.Error(); got != "runcap: RUN_CLOSED (FailedPrecondition): run closed" {
		t.Fatalf("Error() = %q", got)
	}
	// A parent run that is closed is another reason, and a proxy's RUN_CLOSED
	// matches by code only.
	parent := withDetails(t, codes.FailedPrecondition, "parent run closed",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "PARENT_RUN_CLOSED"})
	foreign := withDetails(t, codes.FailedPrecondition, "closed",
		&errdetails.ErrorInfo{Domain: "proxy.example", Reason: "RUN_CLOSED"})
	if runcaperr.IsRunClosed(parent) || runcaperr.IsRunClosed(foreign) || !runcaperr.IsFailedPrecondition(foreign) {
		t.Fatalf("%v / %v", parent, foreign)
	}
}

func TestSubagentLimitError(t *testing.T) {
	err := withDetails(t, codes.FailedPrecondition, "too many children",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "SUBAGENT_LIMIT",
			Metadata: map[string]string{"run_id": "child"}},
		&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
			{Type: "SUBAGENT_LIMIT", Subject: "root", Description: "run 'root' has its 2 children"},
		}})
	wrapped := fmt.Errorf("creating a subagent: %w", err)
	if !runcaperr.IsSubagentLimit(wrapped) || !runcaperr.IsFailedPrecondition(wrapped) ||
		!errors.Is(runcaperr.FromError(wrapped), runcaperr.ErrSubagentLimit) ||
		runcaperr.IsParentRunClosed(wrapped) || runcaperr.IsRunClosed(wrapped) {
		t.Fatalf("predicates on %v", wrapped)
	}
	e := runcaperr.FromError(wrapped)
	if e.Reason != runcapv1.ErrorReason_ERROR_REASON_SUBAGENT_LIMIT || e.Metadata["run_id"] != "child" ||
		len(e.PreconditionViolations) != 1 || e.PreconditionViolations[0].Subject != "root" || e.Retryable() {
		t.Fatalf("%+v", e)
	}
	if got := e.Error(); got != "runcap: SUBAGENT_LIMIT (FailedPrecondition): too many children" {
		t.Fatalf("Error() = %q", got)
	}
	foreign := withDetails(t, codes.FailedPrecondition, "limit",
		&errdetails.ErrorInfo{Domain: "proxy.example", Reason: "SUBAGENT_LIMIT"})
	if runcaperr.IsSubagentLimit(foreign) {
		t.Fatalf("a proxy's SUBAGENT_LIMIT matched: %v", foreign)
	}
}

func TestDecisionNotFoundError(t *testing.T) {
	err := withDetails(t, codes.NotFound, "no decision \"dec-1\"",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "DECISION_NOT_FOUND",
			Metadata: map[string]string{"decision_id": "dec-1"}},
		&errdetails.ResourceInfo{ResourceType: "runcap.v1.Decision", ResourceName: "dec-1"})
	wrapped := fmt.Errorf("explaining a decision: %w", err)
	if !runcaperr.IsDecisionNotFound(wrapped) || !runcaperr.IsNotFound(wrapped) ||
		!errors.Is(runcaperr.FromError(wrapped), runcaperr.ErrDecisionNotFound) ||
		runcaperr.IsRunNotFound(wrapped) || runcaperr.IsReservationNotFound(wrapped) {
		t.Fatalf("predicates on %v", wrapped)
	}
	e := runcaperr.FromError(wrapped)
	if e.Reason != runcapv1.ErrorReason_ERROR_REASON_DECISION_NOT_FOUND || e.Metadata["decision_id"] != "dec-1" ||
		e.Resource == nil || e.Resource.Type != "runcap.v1.Decision" || e.Resource.Name != "dec-1" || e.Retryable() {
		t.Fatalf("%+v", e)
	}
	if got := e.Error(); got != `runcap: DECISION_NOT_FOUND (NotFound): no decision "dec-1"` {
		t.Fatalf("Error() = %q", got)
	}
	// A run that is not found is another reason, and a proxy's
	// DECISION_NOT_FOUND matches by code only.
	run := withDetails(t, codes.NotFound, "no run",
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "RUN_NOT_FOUND"})
	foreign := withDetails(t, codes.NotFound, "no decision",
		&errdetails.ErrorInfo{Domain: "proxy.example", Reason: "DECISION_NOT_FOUND"})
	if runcaperr.IsDecisionNotFound(run) || runcaperr.IsDecisionNotFound(foreign) || !runcaperr.IsNotFound(foreign) {
		t.Fatalf("%v / %v", run, foreign)
	}
}

func TestApprovalNotFoundError(t *testing.T) {
	// As the server sends it: no metadata, the ResourceInfo names the approval.
	err := withDetails(t, codes.NotFound, `there is no approval "run-1/approval:spend"`,
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "APPROVAL_NOT_FOUND"},
		&errdetails.ResourceInfo{ResourceType: "runcap.v1.Approval", ResourceName: "run-1/approval:spend"})
	wrapped := fmt.Errorf("approving: %w", err)
	if !runcaperr.IsApprovalNotFound(wrapped) || !runcaperr.IsNotFound(wrapped) ||
		!errors.Is(runcaperr.FromError(wrapped), runcaperr.ErrApprovalNotFound) ||
		runcaperr.IsDecisionNotFound(wrapped) || runcaperr.IsRunNotFound(wrapped) || runcaperr.IsApprovalResolved(wrapped) {
		t.Fatalf("predicates on %v", wrapped)
	}
	e := runcaperr.FromError(wrapped)
	if e.Reason != runcapv1.ErrorReason_ERROR_REASON_APPROVAL_NOT_FOUND || e.Resource == nil ||
		e.Resource.Type != "runcap.v1.Approval" || e.Resource.Name != "run-1/approval:spend" || e.Retryable() {
		t.Fatalf("%+v", e)
	}
	// A proxy's APPROVAL_NOT_FOUND matches by code only.
	foreign := withDetails(t, codes.NotFound, "no approval",
		&errdetails.ErrorInfo{Domain: "proxy.example", Reason: "APPROVAL_NOT_FOUND"})
	if runcaperr.IsApprovalNotFound(foreign) || !runcaperr.IsNotFound(foreign) {
		t.Fatalf("%v", foreign)
	}
}

func TestApprovalResolvedError(t *testing.T) {
	err := withDetails(t, codes.FailedPrecondition, `approval "run-1/approval:spend" is already denied`,
		&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: "APPROVAL_RESOLVED",
			Metadata: map[string]string{"run_id": "run-1", "reservation_id": ""}},
		&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
			{Type: "APPROVAL_RESOLVED", Subject: "run-1/approval:spend", Description: "already denied"},
		}})
	wrapped := fmt.Errorf("approving: %w", err)
	if !runcaperr.IsApprovalResolved(wrapped) || !runcaperr.IsFailedPrecondition(wrapped) ||
		!errors.Is(runcaperr.FromError(wrapped), runcaperr.ErrApprovalResolved) ||
		runcaperr.IsRunClosed(wrapped) || runcaperr.IsReservationBlocked(wrapped) || runcaperr.IsApprovalNotFound(wrapped) {
		t.Fatalf("predicates on %v", wrapped)
	}
	e := runcaperr.FromError(wrapped)
	if e.Reason != runcapv1.ErrorReason_ERROR_REASON_APPROVAL_RESOLVED || e.Metadata["run_id"] != "run-1" ||
		len(e.PreconditionViolations) != 1 || e.PreconditionViolations[0].Subject != "run-1/approval:spend" || e.Retryable() {
		t.Fatalf("%+v", e)
	}
	if got := e.Error(); got != `runcap: APPROVAL_RESOLVED (FailedPrecondition): approval "run-1/approval:spend" is already denied` {
		t.Fatalf("Error() = %q", got)
	}
}
