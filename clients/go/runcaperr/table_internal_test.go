package runcaperr

import (
	"testing"

	"google.golang.org/grpc/codes"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

// reasonSentinels is the sentinel each ErrorReason is matched by: its own,
// or its code's for the reasons that are the only ones of their code.
var reasonSentinels = map[runcapv1.ErrorReason]error{
	runcapv1.ErrorReason_ERROR_REASON_INVALID_ARGUMENT:      ErrInvalidArgument,
	runcapv1.ErrorReason_ERROR_REASON_RUN_NOT_FOUND:         ErrRunNotFound,
	runcapv1.ErrorReason_ERROR_REASON_RESERVATION_NOT_FOUND: ErrReservationNotFound,
	runcapv1.ErrorReason_ERROR_REASON_RUN_ALREADY_EXISTS:    ErrRunAlreadyExists,
	runcapv1.ErrorReason_ERROR_REASON_IDEMPOTENCY_CONFLICT:  ErrIdempotencyConflict,
	runcapv1.ErrorReason_ERROR_REASON_RESERVATION_BLOCKED:   ErrReservationBlocked,
	runcapv1.ErrorReason_ERROR_REASON_RESERVATION_RELEASED:  ErrReservationReleased,
	runcapv1.ErrorReason_ERROR_REASON_REVISION_OUT_OF_RANGE: ErrRevisionOutOfRange,
	runcapv1.ErrorReason_ERROR_REASON_BACKEND_UNAVAILABLE:   ErrBackendUnavailable,
	runcapv1.ErrorReason_ERROR_REASON_SHUTTING_DOWN:         ErrShuttingDown,
	runcapv1.ErrorReason_ERROR_REASON_INTERNAL:              ErrInternal,
	runcapv1.ErrorReason_ERROR_REASON_PARENT_RUN_NOT_FOUND:  ErrParentRunNotFound,
	runcapv1.ErrorReason_ERROR_REASON_PARENT_RUN_CLOSED:     ErrParentRunClosed,
	runcapv1.ErrorReason_ERROR_REASON_RUN_CLOSED:            ErrRunClosed,
	runcapv1.ErrorReason_ERROR_REASON_SUBAGENT_LIMIT:        ErrSubagentLimit,
	runcapv1.ErrorReason_ERROR_REASON_DECISION_NOT_FOUND:    ErrDecisionNotFound,
	runcapv1.ErrorReason_ERROR_REASON_APPROVAL_NOT_FOUND:    ErrApprovalNotFound,
	runcapv1.ErrorReason_ERROR_REASON_APPROVAL_RESOLVED:     ErrApprovalResolved,
	runcapv1.ErrorReason_ERROR_REASON_UNAUTHENTICATED:       ErrUnauthenticated,
	runcapv1.ErrorReason_ERROR_REASON_PERMISSION_DENIED:     ErrPermissionDenied,
	runcapv1.ErrorReason_ERROR_REASON_OPEN_RUN_LIMIT:        ErrOpenRunLimit,
}

// TestEveryErrorReasonHasOneSentinel fails when the contract gains an
// ErrorReason this package has no sentinel for: each reason must be matched
// by its row's sentinel and by no other reason's own sentinel.
func TestEveryErrorReasonHasOneSentinel(t *testing.T) {
	for number, name := range runcapv1.ErrorReason_name {
		reason := runcapv1.ErrorReason(number)
		if reason == runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED {
			continue
		}
		sentinel, ok := reasonSentinels[reason]
		if !ok {
			t.Errorf("no sentinel for %s", name)
			continue
		}
		k := sentinel.(*kind)
		if k.reason != runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED && k.reason != reason {
			t.Errorf("%s: sentinel %v is another reason's", name, sentinel)
		}
		e := &Error{Code: k.code, Reason: reason}
		if !e.Is(sentinel) {
			t.Errorf("%s does not match its sentinel %v", name, sentinel)
		}
		for other, s := range reasonSentinels {
			if other != reason && s.(*kind).reason != runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED && e.Is(s) {
				t.Errorf("%s matches the sentinel of %s too", name, other)
			}
		}
	}
	if len(reasonSentinels) != len(runcapv1.ErrorReason_name)-1 {
		t.Errorf("%d sentinels for %d reasons", len(reasonSentinels), len(runcapv1.ErrorReason_name)-1)
	}
	if ErrSubagentLimit.(*kind).code != codes.FailedPrecondition {
		t.Error("SUBAGENT_LIMIT is FAILED_PRECONDITION")
	}
	if ErrDecisionNotFound.(*kind).code != codes.NotFound {
		t.Error("DECISION_NOT_FOUND is NOT_FOUND")
	}
	if ErrApprovalNotFound.(*kind).code != codes.NotFound {
		t.Error("APPROVAL_NOT_FOUND is NOT_FOUND")
	}
	if ErrApprovalResolved.(*kind).code != codes.FailedPrecondition {
		t.Error("APPROVAL_RESOLVED is FAILED_PRECONDITION")
	}
}
