// Package runcaperr turns the rich gRPC statuses of the runcap server back
// into typed Go errors.
//
// The server reports every failure as a google.rpc.Status with exactly one
// google.rpc.ErrorInfo (domain "runcap.dev", reason a runcapv1.ErrorReason
// name without its "ERROR_REASON_" prefix, plus metadata) and at most one
// detail of each other type: BadRequest, ResourceInfo, PreconditionFailure,
// RetryInfo. [FromError] reads all of them into one [*Error].
//
// Test for a kind of failure with the Is* predicates (which accept any error
// carrying a gRPC status, raw stub errors included), with errors.Is and the
// sentinels of this package on the errors the runcap client returns
// (errors.Is(err, runcaperr.ErrRunNotFound)), or get the whole [*Error] with
// errors.As or [FromError]. A status without a runcap
// ErrorInfo (from a proxy, or the transport itself) matches the sentinels of
// its gRPC code only (ErrNotFound, ErrUnavailable...), never those of a
// reason.
//
// A block decision of Reserve is not an error and never appears here: it
// travels in the ReserveResponse.
package runcaperr

import (
	"context"
	"errors"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

// Domain is the ErrorInfo domain of every error the runcap server sends.
const Domain = "runcap.dev"

const reasonPrefix = "ERROR_REASON_"

// FieldViolation is one offending request field of an INVALID_ARGUMENT error
// (from its google.rpc.BadRequest detail).
type FieldViolation struct {
	// Field is the path of the field, for example "amount_micros".
	Field string
	// Description says what is wrong with it.
	Description string
}

// ResourceInfo names the resource an error is about (from its
// google.rpc.ResourceInfo detail), for example a run or a reservation.
type ResourceInfo struct {
	// Type is the resource's type, for example "runcap.v1.Run".
	Type string
	// Name is the resource's name: a run id, or "run_id/reservation_id".
	Name string
	// Description says what happened to it.
	Description string
}

// PreconditionViolation is one failed precondition of a FAILED_PRECONDITION
// error (from its google.rpc.PreconditionFailure detail).
type PreconditionViolation struct {
	// Type is the kind of precondition, for example "RESERVATION_BLOCKED".
	Type string
	// Subject is what failed it: "run_id/reservation_id".
	Subject string
	// Description says why.
	Description string
}

// Error is a failed runcap call, with everything its status carried.
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Reason is the runcap reason, or ERROR_REASON_UNSPECIFIED when the status
	// had no runcap ErrorInfo or a reason this client does not know (see
	// ReasonName).
	Reason runcapv1.ErrorReason
	// ReasonName is the ErrorInfo reason as sent ("RUN_NOT_FOUND"), also for
	// an ErrorInfo of another domain; empty without ErrorInfo.
	ReasonName string
	// Domain is the ErrorInfo domain ("runcap.dev" for the server's own
	// errors); empty without ErrorInfo.
	Domain string
	// Message is the status message, written for humans.
	Message string
	// Metadata is the ErrorInfo metadata, for example run_id and
	// reservation_id. Never nil.
	Metadata map[string]string
	// FieldViolations lists every offending field of an INVALID_ARGUMENT
	// error.
	FieldViolations []FieldViolation
	// Resource names the resource of a NOT_FOUND or ALREADY_EXISTS error.
	Resource *ResourceInfo
	// PreconditionViolations says which precondition a FAILED_PRECONDITION
	// error failed.
	PreconditionViolations []PreconditionViolation
	// RetryDelay is how long the server asks the client to wait before
	// retrying (from google.rpc.RetryInfo); zero when it gave no delay. See
	// HasRetryDelay.
	RetryDelay time.Duration
	// HasRetryDelay tells whether the status carried a RetryInfo.
	HasRetryDelay bool
	// Details holds every unpacked detail message, ErrorInfo included, in
	// the order sent; details of unknown types are left out.
	Details []proto.Message

	status *status.Status
}

// Error implements error: "runcap: RUN_NOT_FOUND (NotFound): run ...".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("runcap: ")
	if e.ReasonName != "" {
		b.WriteString(e.ReasonName)
		b.WriteString(" (")
		b.WriteString(e.Code.String())
		b.WriteString(")")
	} else {
		b.WriteString(e.Code.String())
	}
	if e.Message != "" {
		b.WriteString(": ")
		b.WriteString(e.Message)
	}
	return b.String()
}

// GRPCStatus returns the status the error was made from, so that
// status.FromError and status.Code keep working on it.
func (e *Error) GRPCStatus() *status.Status {
	if e.status == nil {
		return status.New(e.Code, e.Message)
	}
	return e.status
}

// Is reports whether the error matches target: one of this package's
// sentinels (by code, and by reason for the sentinels of a reason), or
// context.DeadlineExceeded / context.Canceled for those codes.
func (e *Error) Is(target error) bool {
	switch t := target.(type) {
	case *kind:
		if e.Code != t.code {
			return false
		}
		return t.reason == runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED || t.reason == e.Reason
	}
	switch target {
	case context.DeadlineExceeded:
		return e.Code == codes.DeadlineExceeded
	case context.Canceled:
		return e.Code == codes.Canceled
	}
	return false
}

// Retryable reports whether retrying the same request may succeed: the code
// is UNAVAILABLE (nothing was decided; back off first).
func (e *Error) Retryable() bool { return e.Code == codes.Unavailable }

// kind is a sentinel: a gRPC code, and optionally a runcap reason.
type kind struct {
	code   codes.Code
	reason runcapv1.ErrorReason
}

func (k *kind) Error() string {
	if k.reason != runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED {
		return "runcap: " + strings.TrimPrefix(k.reason.String(), reasonPrefix)
	}
	return "runcap: " + k.code.String()
}

func codeKind(c codes.Code) error { return &kind{code: c} }
func reasonKind(c codes.Code, r runcapv1.ErrorReason) error {
	return &kind{code: c, reason: r}
}

// Sentinels for errors.Is. Those of a gRPC code match any error with that
// code; those of a reason match only the runcap errors with that reason.
var (
	ErrInvalidArgument     = codeKind(codes.InvalidArgument)
	ErrNotFound            = codeKind(codes.NotFound)
	ErrAlreadyExists       = codeKind(codes.AlreadyExists)
	ErrFailedPrecondition  = codeKind(codes.FailedPrecondition)
	ErrOutOfRange          = codeKind(codes.OutOfRange)
	ErrUnavailable         = codeKind(codes.Unavailable)
	ErrUnauthenticated     = codeKind(codes.Unauthenticated)
	ErrPermissionDenied    = codeKind(codes.PermissionDenied)
	ErrResourceExhausted   = codeKind(codes.ResourceExhausted)
	ErrInternal            = codeKind(codes.Internal)
	ErrRunNotFound         = reasonKind(codes.NotFound, runcapv1.ErrorReason_ERROR_REASON_RUN_NOT_FOUND)
	ErrReservationNotFound = reasonKind(codes.NotFound, runcapv1.ErrorReason_ERROR_REASON_RESERVATION_NOT_FOUND)
	ErrRunAlreadyExists    = reasonKind(codes.AlreadyExists, runcapv1.ErrorReason_ERROR_REASON_RUN_ALREADY_EXISTS)
	ErrIdempotencyConflict = reasonKind(codes.AlreadyExists, runcapv1.ErrorReason_ERROR_REASON_IDEMPOTENCY_CONFLICT)
	ErrReservationBlocked  = reasonKind(codes.FailedPrecondition, runcapv1.ErrorReason_ERROR_REASON_RESERVATION_BLOCKED)
	ErrReservationReleased = reasonKind(codes.FailedPrecondition, runcapv1.ErrorReason_ERROR_REASON_RESERVATION_RELEASED)
	ErrRevisionOutOfRange  = reasonKind(codes.OutOfRange, runcapv1.ErrorReason_ERROR_REASON_REVISION_OUT_OF_RANGE)
	ErrBackendUnavailable  = reasonKind(codes.Unavailable, runcapv1.ErrorReason_ERROR_REASON_BACKEND_UNAVAILABLE)
	ErrShuttingDown        = reasonKind(codes.Unavailable, runcapv1.ErrorReason_ERROR_REASON_SHUTTING_DOWN)
	ErrParentRunNotFound   = reasonKind(codes.NotFound, runcapv1.ErrorReason_ERROR_REASON_PARENT_RUN_NOT_FOUND)
	ErrParentRunClosed     = reasonKind(codes.FailedPrecondition, runcapv1.ErrorReason_ERROR_REASON_PARENT_RUN_CLOSED)
	ErrRunClosed           = reasonKind(codes.FailedPrecondition, runcapv1.ErrorReason_ERROR_REASON_RUN_CLOSED)
	ErrSubagentLimit       = reasonKind(codes.FailedPrecondition, runcapv1.ErrorReason_ERROR_REASON_SUBAGENT_LIMIT)
	ErrDecisionNotFound    = reasonKind(codes.NotFound, runcapv1.ErrorReason_ERROR_REASON_DECISION_NOT_FOUND)
	ErrApprovalNotFound    = reasonKind(codes.NotFound, runcapv1.ErrorReason_ERROR_REASON_APPROVAL_NOT_FOUND)
	ErrApprovalResolved    = reasonKind(codes.FailedPrecondition, runcapv1.ErrorReason_ERROR_REASON_APPROVAL_RESOLVED)
	ErrOpenRunLimit        = reasonKind(codes.ResourceExhausted, runcapv1.ErrorReason_ERROR_REASON_OPEN_RUN_LIMIT)
)

// FromError returns the runcap error err is or wraps: an *Error found with
// errors.As, or one built from the gRPC status err carries. It returns nil
// when err is nil or carries no gRPC status (a context error raised before
// any call, say).
func FromError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	var carrier interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &carrier) {
		return nil
	}
	return FromStatus(carrier.GRPCStatus())
}

// FromStatus reads a gRPC status and its details into an *Error. It returns
// nil for a nil status or an OK one.
func FromStatus(st *status.Status) *Error {
	if st == nil || st.Code() == codes.OK {
		return nil
	}
	e := &Error{
		Code:     st.Code(),
		Message:  st.Message(),
		Metadata: map[string]string{},
		status:   st,
	}
	var foreign *errdetails.ErrorInfo
	ours := false
	for _, d := range st.Details() {
		m, ok := d.(proto.Message)
		if !ok {
			continue // a detail of a type not linked into this binary
		}
		e.Details = append(e.Details, m)
		switch d := m.(type) {
		case *errdetails.ErrorInfo:
			if d.GetDomain() == Domain && !ours {
				ours = true
				e.setInfo(d)
			} else if foreign == nil {
				foreign = d
			}
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations,
					FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.ResourceInfo:
			if e.Resource == nil {
				e.Resource = &ResourceInfo{
					Type: d.GetResourceType(), Name: d.GetResourceName(), Description: d.GetDescription(),
				}
			}
		case *errdetails.PreconditionFailure:
			for _, v := range d.GetViolations() {
				e.PreconditionViolations = append(e.PreconditionViolations,
					PreconditionViolation{Type: v.GetType(), Subject: v.GetSubject(), Description: v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			if !e.HasRetryDelay {
				e.HasRetryDelay = true
				e.RetryDelay = d.GetRetryDelay().AsDuration()
			}
		}
	}
	if !ours && foreign != nil {
		// Not from runcap (a proxy's, say): keep it for display only; the
		// reason stays UNSPECIFIED so that only the code's sentinels match.
		e.Domain = foreign.GetDomain()
		e.ReasonName = foreign.GetReason()
		for k, v := range foreign.GetMetadata() {
			e.Metadata[k] = v
		}
	}
	return e
}

func (e *Error) setInfo(info *errdetails.ErrorInfo) {
	e.Domain = info.GetDomain()
	e.ReasonName = info.GetReason()
	if v, ok := runcapv1.ErrorReason_value[reasonPrefix+info.GetReason()]; ok {
		e.Reason = runcapv1.ErrorReason(v)
	}
	for k, v := range info.GetMetadata() {
		e.Metadata[k] = v
	}
}

// is reports whether err is, or carries a status that is, of kind target.
// Unlike errors.Is it also works on the raw errors of generated stubs.
func is(err error, target error) bool {
	e := FromError(err)
	return e != nil && e.Is(target)
}

// Reason returns the runcap reason of err, or ERROR_REASON_UNSPECIFIED.
func Reason(err error) runcapv1.ErrorReason {
	if e := FromError(err); e != nil {
		return e.Reason
	}
	return runcapv1.ErrorReason_ERROR_REASON_UNSPECIFIED
}

// Code returns the gRPC code of err: OK for nil, Unknown for an error that
// carries no status.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	if e := FromError(err); e != nil {
		return e.Code
	}
	return codes.Unknown
}

// RetryDelay returns the delay the server asked for before a retry, and
// whether err carried one (google.rpc.RetryInfo).
func RetryDelay(err error) (time.Duration, bool) {
	if e := FromError(err); e != nil && e.HasRetryDelay {
		return e.RetryDelay, true
	}
	return 0, false
}

// FieldViolations returns the offending fields of an INVALID_ARGUMENT error.
func FieldViolations(err error) []FieldViolation {
	if e := FromError(err); e != nil {
		return e.FieldViolations
	}
	return nil
}

// IsInvalidArgument reports whether err is INVALID_ARGUMENT; see FieldViolations.
func IsInvalidArgument(err error) bool { return is(err, ErrInvalidArgument) }

// IsNotFound reports whether err is NOT_FOUND (a run, a reservation, a
// parent run, a decision or an approval).
func IsNotFound(err error) bool { return is(err, ErrNotFound) }

// IsRunNotFound reports whether err says the run does not exist.
func IsRunNotFound(err error) bool { return is(err, ErrRunNotFound) }

// IsReservationNotFound reports whether err says the run has no such reservation.
func IsReservationNotFound(err error) bool { return is(err, ErrReservationNotFound) }

// IsParentRunNotFound reports whether err says CreateRun named a parent run
// that does not exist.
func IsParentRunNotFound(err error) bool { return is(err, ErrParentRunNotFound) }

// IsDecisionNotFound reports whether err says GetDecision named a decision
// the server does not have (never made, or its run aged out); Resource names
// it.
func IsDecisionNotFound(err error) bool { return is(err, ErrDecisionNotFound) }

// IsApprovalNotFound reports whether err says Approve or Deny named an
// approval the run never requested; Resource names it.
func IsApprovalNotFound(err error) bool { return is(err, ErrApprovalNotFound) }

// IsAlreadyExists reports whether err is ALREADY_EXISTS.
func IsAlreadyExists(err error) bool { return is(err, ErrAlreadyExists) }

// IsRunAlreadyExists reports whether err says the run exists with different arguments.
func IsRunAlreadyExists(err error) bool { return is(err, ErrRunAlreadyExists) }

// IsIdempotencyConflict reports whether err says a reservation id was reused
// with different arguments.
func IsIdempotencyConflict(err error) bool { return is(err, ErrIdempotencyConflict) }

// IsFailedPrecondition reports whether err is FAILED_PRECONDITION.
func IsFailedPrecondition(err error) bool { return is(err, ErrFailedPrecondition) }

// IsReservationBlocked reports whether err says the reservation was blocked,
// so there is nothing to commit or refund.
func IsReservationBlocked(err error) bool { return is(err, ErrReservationBlocked) }

// IsReservationReleased reports whether err says the reservation was refunded
// and can no longer be committed.
func IsReservationReleased(err error) bool { return is(err, ErrReservationReleased) }

// IsParentRunClosed reports whether err says CreateRun named a parent run
// that is closed (a closed run takes no new subagent runs).
func IsParentRunClosed(err error) bool { return is(err, ErrParentRunClosed) }

// IsRunClosed reports whether err says SuspendRun or ResumeRun named a run
// that is closed (a closed run can no longer be suspended or resumed).
func IsRunClosed(err error) bool { return is(err, ErrRunClosed) }

// IsSubagentLimit reports whether err says CreateRun would give the parent
// run more children than its policy's max_children, or nest deeper than an
// ancestor's max_depth allows (the PreconditionViolations say which).
func IsSubagentLimit(err error) bool { return is(err, ErrSubagentLimit) }

// IsApprovalResolved reports whether err says the approval was already
// resolved the other way: Approve of a denied approval, or Deny of an
// approved one (the PreconditionViolations' Subject names it). Repeating the
// same call is a replay, not this error.
func IsApprovalResolved(err error) bool { return is(err, ErrApprovalResolved) }

// IsOutOfRange reports whether err is OUT_OF_RANGE.
func IsOutOfRange(err error) bool { return is(err, ErrOutOfRange) }

// IsRevisionOutOfRange reports whether err says a Watch resume point is no
// longer retained (watch again without after_revision).
func IsRevisionOutOfRange(err error) bool { return is(err, ErrRevisionOutOfRange) }

// IsUnavailable reports whether err is UNAVAILABLE: nothing was decided, and
// a retry after RetryDelay may succeed.
func IsUnavailable(err error) bool { return is(err, ErrUnavailable) }

// IsInternal reports whether err is INTERNAL; its message carries a trace id.
func IsInternal(err error) bool { return is(err, ErrInternal) }

// Ensure *Error keeps satisfying the interfaces callers rely on.
var (
	_ error                                    = (*Error)(nil)
	_ interface{ GRPCStatus() *status.Status } = (*Error)(nil)
)
