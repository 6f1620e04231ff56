package runcap

import (
	"context"
	"errors"
	"io"
	"iter"
	"sync"
	"time"

	"google.golang.org/grpc"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

// WatchOption configures Watch.
type WatchOption func(*watchConfig)

type watchConfig struct {
	after       *int64
	afterDigest string
	resume      bool
	resnapshot  bool
	reconnect   RetryPolicy
}

// AfterRevision starts the stream with every change after rev instead of a
// snapshot (0 replays the run's whole retained history).
func AfterRevision(rev int64) WatchOption {
	return func(c *watchConfig) { c.after = &rev }
}

// AfterDigest gives the digest (BudgetState.digest) of the state at the
// AfterRevision resume point, as the caller last saw it, so that the server
// can tell when its history at that revision is no longer the one the caller
// saw (for example after a failover lost writes) and fail with
// runcaperr.ErrRevisionOutOfRange (ErrorInfo metadata diverged="true")
// instead of silently resuming on another history. Ignored without
// AfterRevision. Resumes after a disconnect always send the digest of the
// last message delivered.
func AfterDigest(digest string) WatchOption {
	return func(c *watchConfig) { c.afterDigest = digest }
}

// NoResume turns automatic resuming off: a disconnect, or the server's final
// progress message, ends the stream (Recv returns the error, or io.EOF after
// delivering the final progress message).
func NoResume() WatchOption {
	return func(c *watchConfig) { c.resume = false }
}

// ResnapshotOnOutOfRange makes a resume point the server no longer retains
// restart the stream with a fresh snapshot (which the caller must treat as a
// reset) instead of failing with runcaperr.ErrRevisionOutOfRange.
func ResnapshotOnOutOfRange() WatchOption {
	return func(c *watchConfig) { c.resnapshot = true }
}

// WatchReconnect sets the reconnect policy (DefaultWatchReconnect when not
// given): MaxAttempts consecutive failed connects end the stream with the
// last error.
func WatchReconnect(p RetryPolicy) WatchOption {
	return func(c *watchConfig) { c.reconnect = p }
}

// WatchStream is a Watch stream that resumes across disconnects. Use Recv
// (or range over All) from one goroutine; Close may be called from any.
type WatchStream struct {
	client *Client
	runID  string
	ctx    context.Context
	cancel context.CancelFunc
	cfg    watchConfig

	// The resume state, owned by the receiving goroutine.
	stream   grpc.ServerStreamingClient[runcapv1.WatchResponse]
	stop     context.CancelFunc // cancels the current call
	last     *int64
	digest   string // the digest of the history up to last; "" = unknown
	failures int
	final    bool
	delay    time.Duration
	connects int
	done     error

	mu           sync.Mutex
	lastShared   *int64
	digestShared string
	reconnects   int
}

// Watch streams a run's budget state: a snapshot first (or, with
// AfterRevision, every change after that revision), then every change in
// revision order, with progress heartbeats in between.
//
// A disconnect (UNAVAILABLE, or the server ending the stream with a final
// progress message because it shuts down) reconnects from the last revision
// delivered, with jittered exponential back-off, and no event is delivered
// twice; the final progress message itself is not delivered. After the
// reconnect policy's attempts the last error is returned. Each resume sends
// the digest of the state last delivered (WatchRequest.after_digest), so a
// server whose history at that revision differs (a failover lost writes)
// refuses to resume instead of leaving a silent gap. A resume point the
// server no longer retains, or whose history diverged, returns a
// runcaperr.ErrRevisionOutOfRange error, or with ResnapshotOnOutOfRange
// restarts with a fresh snapshot.
//
// The stream lives until ctx is done, Close is called, or it fails; nothing
// is sent before the first Recv.
func (c *Client) Watch(ctx context.Context, runID string, opts ...WatchOption) *WatchStream {
	cfg := watchConfig{resume: true, reconnect: DefaultWatchReconnect}
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := context.WithCancel(c.outgoing(ctx))
	s := &WatchStream{
		client: c, runID: runID, ctx: ctx, cancel: cancel, cfg: cfg,
		last: cfg.after, lastShared: cfg.after,
	}
	if cfg.after != nil {
		s.digest, s.digestShared = cfg.afterDigest, cfg.afterDigest
	}
	return s
}

// Recv returns the next message. It returns io.EOF when the stream ended
// for good (the server ended it without a final progress message, or
// resuming is off), ctx's error once ctx is done or the stream was closed,
// and a *runcaperr.Error when the server failed it (after the reconnect
// attempts, for UNAVAILABLE).
func (s *WatchStream) Recv() (*runcapv1.WatchResponse, error) {
	if s.done != nil {
		return nil, s.done
	}
	msg, err := s.recv()
	if err != nil {
		s.closeCall()
		s.done = err
	}
	return msg, err
}

// All ranges over the stream's messages; it ends after yielding (nil, err)
// for a failure, at io.EOF (not yielded), or when the loop breaks (which
// closes the stream).
func (s *WatchStream) All() iter.Seq2[*runcapv1.WatchResponse, error] {
	return func(yield func(*runcapv1.WatchResponse, error) bool) {
		defer s.Close()
		for {
			msg, err := s.Recv()
			if errors.Is(err, io.EOF) {
				return
			}
			if !yield(msg, err) || err != nil {
				return
			}
		}
	}
}

// Close cancels the stream; Recv then returns context.Canceled.
func (s *WatchStream) Close() { s.cancel() }

// LastRevision is the revision of the last message delivered (the resume
// point), and false before the first.
func (s *WatchStream) LastRevision() (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastShared == nil {
		return 0, false
	}
	return *s.lastShared, true
}

// LastDigest is the digest of the run's history up to LastRevision (the
// digest of the last event's state or of the snapshot), to pass back with
// AfterDigest along with AfterRevision(LastRevision) when watching again
// later; "" when unknown (before the first message, or when the resume
// point was last advanced by a progress message).
func (s *WatchStream) LastDigest() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.digestShared
}

// Reconnects is how many times the stream has reconnected so far.
func (s *WatchStream) Reconnects() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reconnects
}

func (s *WatchStream) recv() (*runcapv1.WatchResponse, error) {
	for {
		if err := s.ctx.Err(); err != nil {
			return nil, err
		}
		if s.stream == nil {
			if err := sleep(s.ctx, s.delay); err != nil {
				return nil, err
			}
			if err := s.open(); err != nil {
				if retry := s.onError(err); retry != nil {
					return nil, retry
				}
				continue
			}
		}
		msg, err := s.stream.Recv()
		if err == nil {
			if s.accept(msg) {
				return msg, nil
			}
			continue
		}
		s.closeCall()
		if errors.Is(err, io.EOF) {
			if !s.final || !s.cfg.resume {
				return nil, io.EOF
			}
			// The server is draining: reconnect at once, as another replica
			// may take the stream; back off if streams keep ending.
			s.failures++
			s.delay = 0
			if s.failures > 1 {
				s.delay = s.cfg.reconnect.Backoff(s.failures - 1)
			}
			continue
		}
		if final := s.onError(err); final != nil {
			return nil, final
		}
	}
}

func (s *WatchStream) open() error {
	req := &runcapv1.WatchRequest{RunId: s.runID}
	if s.last != nil {
		rev := *s.last
		req.AfterRevision = &rev
		req.AfterDigest = s.digest
	}
	s.final = false
	callCtx, stop := context.WithCancel(s.ctx)
	stream, err := s.client.stub.Watch(callCtx, req)
	if err != nil {
		stop()
		return err
	}
	s.stream, s.stop = stream, stop
	s.connects++
	if s.connects > 1 {
		s.mu.Lock()
		s.reconnects++
		s.mu.Unlock()
	}
	return nil
}

func (s *WatchStream) closeCall() {
	if s.stop != nil {
		s.stop()
	}
	s.stream, s.stop = nil, nil
}

// onError decides what a failed connect or stream does: nil to reconnect
// (after s.delay), or the error to return.
func (s *WatchStream) onError(err error) error {
	if ctxErr := s.ctx.Err(); ctxErr != nil {
		return ctxErr
	}
	rerr := runcaperr.FromError(err)
	if rerr == nil {
		return err
	}
	if runcaperr.IsRevisionOutOfRange(rerr) && s.cfg.resnapshot && s.last != nil {
		// Start over from a fresh snapshot, which the caller sees next.
		// (LastRevision and LastDigest keep reporting the last delivered
		// message until then.)
		s.last, s.digest = nil, ""
		s.delay = 0
		return nil
	}
	if !s.cfg.resume {
		return rerr
	}
	s.failures++
	delay, ok := s.cfg.reconnect.delay(s.failures, rerr)
	if !ok {
		return rerr
	}
	s.delay = delay
	return nil
}

// accept records msg and reports whether it should reach the caller.
func (s *WatchStream) accept(msg *runcapv1.WatchResponse) bool {
	final := msg.GetProgress().GetFinal()
	if !final {
		s.failures = 0
	}
	rev := msg.GetRevision()
	switch msg.GetKind().(type) {
	case *runcapv1.WatchResponse_Event:
		if s.last != nil && rev <= *s.last {
			return false // already delivered before a reconnect
		}
	case *runcapv1.WatchResponse_Progress:
		if final {
			s.final = true
			if s.cfg.resume {
				return false
			}
		}
		if s.last != nil && rev < *s.last {
			return false
		}
	}
	if s.last == nil || rev > *s.last {
		// Progress advancing the resume point carries no state: the digest
		// at its revision is unknown.
		digest := ""
		switch kind := msg.GetKind().(type) {
		case *runcapv1.WatchResponse_Event:
			digest = kind.Event.GetState().GetDigest()
		case *runcapv1.WatchResponse_Snapshot:
			digest = kind.Snapshot.GetDigest()
		}
		s.setLast(&rev, digest)
	}
	return true
}

// setLast moves the resume point.
func (s *WatchStream) setLast(rev *int64, digest string) {
	s.last, s.digest = rev, digest
	s.mu.Lock()
	s.lastShared, s.digestShared = rev, digest
	s.mu.Unlock()
}
