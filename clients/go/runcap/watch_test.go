package runcap_test

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/runcap/runcap/clients/go/internal/testserver"
	"github.com/runcap/runcap/clients/go/runcap"
	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

// nextEvent returns the next event, skipping progress heartbeats.
func nextEvent(t *testing.T, s *runcap.WatchStream) *runcapv1.WatchResponse {
	t.Helper()
	for {
		msg, err := s.Recv()
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		if msg.GetProgress() == nil {
			return msg
		}
	}
}

func TestWatchSnapshotThenOrderedEvents(t *testing.T) {
	c := dial(t, addr)
	ctx := testContext(t)
	runID := newRun(t, c, 100_000)

	stream := c.Watch(ctx, runID)
	defer stream.Close()
	first := nextEvent(t, stream)
	if first.GetSnapshot() == nil || first.GetRevision() != 1 || first.GetSnapshot().GetLimitMicros() != 100_000 {
		t.Fatalf("first message %v", first)
	}

	h, err := c.Hold(ctx, runID, 10_000, runcap.ReservationID("w1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Commit(ctx, 4_000); err != nil {
		t.Fatal(err)
	}
	h2, err := c.Hold(ctx, runID, 5_000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h2.Refund(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CloseRun(ctx, runID); err != nil {
		t.Fatal(err)
	}
	want := []runcapv1.EventType{
		runcapv1.EventType_EVENT_TYPE_RESERVED, runcapv1.EventType_EVENT_TYPE_COMMITTED,
		runcapv1.EventType_EVENT_TYPE_RESERVED, runcapv1.EventType_EVENT_TYPE_REFUNDED,
		runcapv1.EventType_EVENT_TYPE_CLOSED,
	}
	for i, typ := range want {
		msg := nextEvent(t, stream)
		ev := msg.GetEvent()
		if ev == nil || ev.GetType() != typ || msg.GetRevision() != int64(i+2) || ev.GetState().GetRevision() != msg.GetRevision() {
			t.Fatalf("event %d: %v; want %v at revision %d", i, msg, typ, i+2)
		}
	}
	if rev, ok := stream.LastRevision(); !ok || rev != 6 {
		t.Fatalf("LastRevision = %d, %v", rev, ok)
	}

	// Resuming after revision 1 replays the changes, with no snapshot.
	resumed := c.Watch(ctx, runID, runcap.AfterRevision(1))
	defer resumed.Close()
	for rev := int64(2); rev <= 6; rev++ {
		if msg := nextEvent(t, resumed); msg.GetEvent() == nil || msg.GetRevision() != rev {
			t.Fatalf("resumed: %v; want the event of revision %d", msg, rev)
		}
	}

	// A resume point the server does not have: a fresh snapshot instead.
	reset := c.Watch(ctx, runID, runcap.AfterRevision(1_000), runcap.ResnapshotOnOutOfRange())
	defer reset.Close()
	if msg := nextEvent(t, reset); msg.GetSnapshot() == nil || msg.GetRevision() != 6 {
		t.Fatalf("after OUT_OF_RANGE: %v; want a snapshot at revision 6", msg)
	}

	// The iterator form; breaking out of the loop closes the stream.
	n := 0
	for msg, err := range c.Watch(ctx, runID).All() {
		if err != nil {
			t.Fatal(err)
		}
		if msg.GetSnapshot() == nil || msg.GetRevision() != 6 {
			t.Fatalf("All: %v", msg)
		}
		n++
		break
	}
	if n != 1 {
		t.Fatalf("All yielded %d messages", n)
	}
}

// TestWatchResumesAcrossServerRestart stops the server (SIGTERM: Watch
// streams get a final progress message) and starts it again on the same port
// and SQLite file; the stream must deliver every change exactly once, in
// order.
func TestWatchResumesAcrossServerRestart(t *testing.T) {
	port, err := testserver.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	args := []string{
		"--listen", fmt.Sprintf("127.0.0.1:%d", port),
		"--backend", "sqlite", "--sqlite-path", filepath.Join(t.TempDir(), "x.db"),
	}
	srv, err := testserver.Start(args, "RUNCAP_WATCH_HEARTBEAT=500ms")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Stop() })

	patient := runcap.RetryPolicy{MaxAttempts: 30, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, Multiplier: 2}
	var rec watchRequests
	c := dial(t, srv.Addr, runcap.WithRetry(patient), rec.option())
	ctx := testContext(t)
	runID := newRun(t, c, 1_000_000)

	stream := c.Watch(ctx, runID, runcap.WatchReconnect(patient))
	defer stream.Close()
	// Open the stream before any change, so the snapshot is at revision 1.
	first := nextEvent(t, stream)
	if first.GetSnapshot() == nil || first.GetRevision() != 1 {
		t.Fatalf("first message %v", first)
	}
	digests := map[int64]string{1: first.GetSnapshot().GetDigest()} // by revision
	type item struct {
		msg *runcapv1.WatchResponse
		err error
	}
	items := make(chan item, 100)
	go func() {
		for msg, err := range stream.All() {
			items <- item{msg, err}
		}
		close(items)
	}()
	var revisions []int64
	snapshots := 0
	waitFor := func(rev int64) {
		t.Helper()
		for {
			if last, ok := stream.LastRevision(); ok && last >= rev && len(revisions) > 0 && revisions[len(revisions)-1] >= rev {
				return
			}
			select {
			case it, ok := <-items:
				if !ok {
					t.Fatalf("stream ended waiting for revision %d", rev)
				}
				if it.err != nil {
					t.Fatalf("stream failed waiting for revision %d: %v\nserver log:\n%s", rev, it.err, srv.Log())
				}
				switch {
				case it.msg.GetSnapshot() != nil:
					snapshots++
				case it.msg.GetEvent() != nil:
					revisions = append(revisions, it.msg.GetRevision())
					digests[it.msg.GetRevision()] = it.msg.GetEvent().GetState().GetDigest()
				case it.msg.GetProgress().GetFinal():
					t.Fatalf("the final progress message reached the caller")
				}
			case <-ctx.Done():
				t.Fatalf("timed out waiting for revision %d (got %v)", rev, revisions)
			}
		}
	}

	reserve := func(n int) {
		t.Helper()
		for range n {
			if _, err := c.Reserve(ctx, runID, 1_000); err != nil {
				t.Fatal(err)
			}
		}
	}
	reserve(5) // revisions 2..6
	waitFor(6)

	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	srv, err = testserver.Start(args, "RUNCAP_WATCH_HEARTBEAT=500ms")
	if err != nil {
		t.Fatal(err)
	}
	reserve(5) // revisions 7..11, likely before the stream is back
	if _, err := c.CloseRun(ctx, runID); err != nil {
		t.Fatal(err)
	}
	waitFor(12)

	if snapshots != 0 {
		t.Errorf("%d more snapshots; want none after the first", snapshots)
	}
	for i, rev := range revisions {
		if rev != int64(i+2) {
			t.Fatalf("event revisions %v: want 2..12 each once, in order", revisions)
		}
	}
	if len(revisions) != 11 {
		t.Fatalf("event revisions %v: want 2..12", revisions)
	}
	if stream.Reconnects() < 1 {
		t.Fatalf("Reconnects() = %d; the stream never reconnected", stream.Reconnects())
	}
	// Every resume sent the digest of the state delivered at its revision.
	reqs := rec.forRun(runID)
	if len(reqs) < 2 {
		t.Fatalf("%d Watch requests; want a resume", len(reqs))
	}
	for _, r := range reqs[1:] {
		if r.AfterRevision == nil || r.GetAfterDigest() == "" || r.GetAfterDigest() != digests[r.GetAfterRevision()] {
			t.Errorf("resume request %v; want the digest %q of revision %d", r, digests[r.GetAfterRevision()], r.GetAfterRevision())
		}
	}
}
