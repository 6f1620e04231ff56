package runcap

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

// suspendStub records SuspendRun and ResumeRun requests and fails the first
// calls with the errors queued in fail; any other call panics (the embedded
// interface is nil). No server is involved.
type suspendStub struct {
	runcapv1.BudgetServiceClient
	mu       sync.Mutex
	requests []proto.Message
	fail     []error
}

func (s *suspendStub) next(req proto.Message) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, req)
	if len(s.fail) == 0 {
		return nil
	}
	err := s.fail[0]
	s.fail = s.fail[1:]
	return err
}

func (s *suspendStub) SuspendRun(_ context.Context, req *runcapv1.SuspendRunRequest, _ ...grpc.CallOption) (*runcapv1.SuspendRunResponse, error) {
	if err := s.next(req); err != nil {
		return nil, err
	}
	state := &runcapv1.BudgetState{RunId: req.GetRunId(), Status: runcapv1.RunStatus_RUN_STATUS_SUSPENDED}
	return &runcapv1.SuspendRunResponse{State: state, Replayed: len(s.requests) > 1}, nil
}

func (s *suspendStub) ResumeRun(_ context.Context, req *runcapv1.ResumeRunRequest, _ ...grpc.CallOption) (*runcapv1.ResumeRunResponse, error) {
	if err := s.next(req); err != nil {
		return nil, err
	}
	state := &runcapv1.BudgetState{RunId: req.GetRunId(), Status: runcapv1.RunStatus_RUN_STATUS_OPEN}
	return &runcapv1.ResumeRunResponse{State: state}, nil
}

func statusError(t *testing.T, c codes.Code, reason string) error {
	t.Helper()
	st, err := status.New(c, reason).WithDetails(&errdetails.ErrorInfo{Domain: runcaperr.Domain, Reason: reason})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

var fastRetry = RetryPolicy{MaxAttempts: 4, InitialBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, Multiplier: 2}

func TestSuspendAndResumeRun(t *testing.T) {
	ctx := context.Background()
	stub := &suspendStub{}
	c := newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))

	suspended, err := c.SuspendRun(ctx, "run-1")
	if err != nil || suspended.GetState().GetStatus() != runcapv1.RunStatus_RUN_STATUS_SUSPENDED || suspended.GetReplayed() {
		t.Fatalf("SuspendRun: %v, %v", suspended, err)
	}
	resumed, err := c.ResumeRun(ctx, "run-1")
	if err != nil || resumed.GetState().GetStatus() != runcapv1.RunStatus_RUN_STATUS_OPEN {
		t.Fatalf("ResumeRun: %v, %v", resumed, err)
	}
	want := []proto.Message{
		&runcapv1.SuspendRunRequest{RunId: "run-1"},
		&runcapv1.ResumeRunRequest{RunId: "run-1"},
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

func TestSuspendAndResumeRunRetryUnavailable(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		do   func(*Client) error
	}{
		{"SuspendRun", func(c *Client) error { _, err := c.SuspendRun(ctx, "run-1"); return err }},
		{"ResumeRun", func(c *Client) error { _, err := c.ResumeRun(ctx, "run-1"); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stub := &suspendStub{fail: []error{
				statusError(t, codes.Unavailable, "SHUTTING_DOWN"),
				status.Error(codes.Unavailable, "connection refused"),
			}}
			c := newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))
			if err := tc.do(c); err != nil {
				t.Fatal(err)
			}
			if len(stub.requests) != 3 {
				t.Fatalf("%d attempts, want 3", len(stub.requests))
			}
			for _, req := range stub.requests[1:] {
				if !proto.Equal(req, stub.requests[0]) {
					t.Fatalf("a retry changed the request: %v, %v", req, stub.requests[0])
				}
			}

			// A closed run is final: not retried, and typed.
			stub = &suspendStub{fail: []error{statusError(t, codes.FailedPrecondition, "RUN_CLOSED")}}
			c = newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))
			err := tc.do(c)
			if !runcaperr.IsRunClosed(err) || len(stub.requests) != 1 {
				t.Fatalf("%v after %d attempts", err, len(stub.requests))
			}
			if _, ok := err.(*runcaperr.Error); !ok {
				t.Fatalf("want a *runcaperr.Error, got %T", err)
			}

			// Attempts are bounded by the policy.
			stub = &suspendStub{}
			for range 10 {
				stub.fail = append(stub.fail, status.Error(codes.Unavailable, "down"))
			}
			c = newClient(stub, newConfig([]Option{WithRetry(fastRetry)}))
			if err := tc.do(c); !runcaperr.IsUnavailable(err) || len(stub.requests) != fastRetry.MaxAttempts {
				t.Fatalf("%v after %d attempts", err, len(stub.requests))
			}
		})
	}
}
