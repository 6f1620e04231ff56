package runcap_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/runcap/runcap/clients/go/internal/testserver"
	"github.com/runcap/runcap/clients/go/runcap"
	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

// watchRequests records every WatchRequest a client sends, through a stream
// interceptor.
type watchRequests struct {
	mu   sync.Mutex
	reqs []*runcapv1.WatchRequest
}

func (w *watchRequests) option() runcap.Option {
	return runcap.WithDialOptions(grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return &recordingStream{ClientStream: cs, w: w}, nil
	}))
}

// forRun returns the requests sent for runID, in order.
func (w *watchRequests) forRun(runID string) []*runcapv1.WatchRequest {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []*runcapv1.WatchRequest
	for _, r := range w.reqs {
		if r.GetRunId() == runID {
			out = append(out, r)
		}
	}
	return out
}

type recordingStream struct {
	grpc.ClientStream
	w *watchRequests
}

func (s *recordingStream) SendMsg(m any) error {
	if req, ok := m.(*runcapv1.WatchRequest); ok {
		s.w.mu.Lock()
		s.w.reqs = append(s.w.reqs, proto.Clone(req).(*runcapv1.WatchRequest))
		s.w.mu.Unlock()
	}
	return s.ClientStream.SendMsg(m)
}

// metadata is the ErrorInfo metadata of err, nil when err is no runcap error.
func metadata(err error) map[string]string {
	if rerr := runcaperr.FromError(err); rerr != nil {
		return rerr.Metadata
	}
	return nil
}

// recvErr returns the first error of the stream, skipping messages.
func recvErr(t *testing.T, s *runcap.WatchStream) error {
	t.Helper()
	for {
		msg, err := s.Recv()
		if err != nil {
			return err
		}
		if msg.GetProgress() == nil {
			t.Fatalf("got %v; want an error", msg)
		}
	}
}

func TestWatchAfterDigest(t *testing.T) {
	var rec watchRequests
	c := dial(t, addr, rec.option())
	ctx := testContext(t)
	runID := newRun(t, c, 100_000)

	stream := c.Watch(ctx, runID)
	defer stream.Close()
	if stream.LastDigest() != "" {
		t.Fatalf("LastDigest before the first message = %q", stream.LastDigest())
	}
	snap := nextEvent(t, stream)
	d1 := snap.GetSnapshot().GetDigest()
	if snap.GetSnapshot() == nil || d1 == "" || stream.LastDigest() != d1 {
		t.Fatalf("snapshot %v, LastDigest %q", snap, stream.LastDigest())
	}
	for range 2 {
		if _, err := c.Reserve(ctx, runID, 1_000); err != nil {
			t.Fatal(err)
		}
	}
	ev2, ev3 := nextEvent(t, stream), nextEvent(t, stream)
	d2, d3 := ev2.GetEvent().GetState().GetDigest(), ev3.GetEvent().GetState().GetDigest()
	if ev3.GetRevision() != 3 || d2 == "" || d3 == "" || d2 == d1 || d3 == d2 {
		t.Fatalf("events %v, %v: want revisions 2 and 3 with distinct digests", ev2, ev3)
	}
	if rev, _ := stream.LastRevision(); rev != 3 || stream.LastDigest() != d3 {
		t.Fatalf("LastRevision %d, LastDigest %q; want 3, %q", rev, stream.LastDigest(), d3)
	}

	// The right digest resumes.
	resumed := c.Watch(ctx, runID, runcap.AfterRevision(2), runcap.AfterDigest(d2))
	defer resumed.Close()
	if msg := nextEvent(t, resumed); msg.GetEvent() == nil || msg.GetRevision() != 3 {
		t.Fatalf("resumed with the right digest: %v; want the event of revision 3", msg)
	}
	if resumed.LastDigest() != d3 {
		t.Fatalf("resumed LastDigest %q; want %q", resumed.LastDigest(), d3)
	}

	// Another history at that revision: OUT_OF_RANGE, diverged.
	diverged := c.Watch(ctx, runID, runcap.AfterRevision(2), runcap.AfterDigest(d1))
	defer diverged.Close()
	err := recvErr(t, diverged)
	if !runcaperr.IsRevisionOutOfRange(err) || !errors.Is(err, runcaperr.ErrRevisionOutOfRange) {
		t.Fatalf("wrong digest: %v; want REVISION_OUT_OF_RANGE", err)
	}
	if md := metadata(err); md["diverged"] != "true" || md["after_revision"] != "2" {
		t.Fatalf("wrong digest: metadata %v; want diverged=true, after_revision=2", md)
	}
	if _, err := diverged.Recv(); !runcaperr.IsRevisionOutOfRange(err) {
		t.Fatalf("Recv after the failure: %v; want the same error", err)
	}

	// A resume point past the head is OUT_OF_RANGE but not diverged.
	ahead := c.Watch(ctx, runID, runcap.AfterRevision(1_000), runcap.AfterDigest(d3))
	defer ahead.Close()
	err = recvErr(t, ahead)
	if !runcaperr.IsRevisionOutOfRange(err) || metadata(err)["diverged"] != "false" {
		t.Fatalf("ahead of the head: %v (metadata %v); want REVISION_OUT_OF_RANGE, diverged=false", err, metadata(err))
	}

	// With ResnapshotOnOutOfRange: a fresh snapshot, and its digest from then on.
	reset := c.Watch(ctx, runID, runcap.AfterRevision(2), runcap.AfterDigest("not-a-digest"), runcap.ResnapshotOnOutOfRange())
	defer reset.Close()
	if rev, _ := reset.LastRevision(); rev != 2 || reset.LastDigest() != "not-a-digest" {
		t.Fatalf("before the first Recv: LastRevision %d, LastDigest %q", rev, reset.LastDigest())
	}
	if msg := nextEvent(t, reset); msg.GetSnapshot() == nil || msg.GetRevision() != 3 || msg.GetSnapshot().GetDigest() != d3 {
		t.Fatalf("after a diverged resume: %v; want a snapshot at revision 3 with digest %q", msg, d3)
	}
	if reset.LastDigest() != d3 {
		t.Fatalf("LastDigest after the snapshot %q; want %q", reset.LastDigest(), d3)
	}

	// Without AfterDigest nothing is checked.
	unchecked := c.Watch(ctx, runID, runcap.AfterRevision(2))
	defer unchecked.Close()
	if msg := nextEvent(t, unchecked); msg.GetEvent() == nil || msg.GetRevision() != 3 {
		t.Fatalf("resumed without a digest: %v; want the event of revision 3", msg)
	}
	// AfterDigest without AfterRevision is ignored: a snapshot.
	ignored := c.Watch(ctx, runID, runcap.AfterDigest(d1))
	defer ignored.Close()
	if msg := nextEvent(t, ignored); msg.GetSnapshot() == nil {
		t.Fatalf("AfterDigest alone: %v; want a snapshot", msg)
	}

	type sent struct {
		after  int64
		has    bool
		digest string
	}
	var got []sent
	for _, r := range rec.forRun(runID) {
		got = append(got, sent{r.GetAfterRevision(), r.AfterRevision != nil, r.GetAfterDigest()})
	}
	want := []sent{
		{0, false, ""},            // stream
		{2, true, d2},             // resumed
		{2, true, d1},             // diverged
		{1_000, true, d3},         // ahead
		{2, true, "not-a-digest"}, // reset
		{0, false, ""},            // reset's re-snapshot
		{2, true, ""},             // unchecked
		{0, false, ""},            // ignored
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("requests sent:\n got %v\nwant %v", got, want)
	}
}

// TestWatchDetectsDivergedHistoryOnResume simulates a failover that lost
// writes: the server restarts on the same port with another SQLite file in
// which the same run has another history past the client's resume point. A
// resuming stream must fail with a diverged REVISION_OUT_OF_RANGE instead of
// silently continuing on the other history, and with ResnapshotOnOutOfRange
// start over from a snapshot of the new history.
func TestWatchDetectsDivergedHistoryOnResume(t *testing.T) {
	dir := t.TempDir()
	runID := "go-" + runcap.NewReservationID()[:12]
	patient := runcap.RetryPolicy{MaxAttempts: 30, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond, Multiplier: 2}
	sqliteArgs := func(listen, file string) []string {
		return []string{"--listen", listen, "--backend", "sqlite", "--sqlite-path", filepath.Join(dir, file)}
	}
	ctx := testContext(t)

	// The other history: revisions 2..6 of the same run, never seen by the
	// watchers.
	other, err := testserver.Start(sqliteArgs("127.0.0.1:0", "other.db"))
	if err != nil {
		t.Fatal(err)
	}
	oc := dial(t, other.Addr)
	if _, err := oc.CreateRun(ctx, runID, 1_000_000); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := oc.Reserve(ctx, runID, 2_000); err != nil {
			t.Fatal(err)
		}
	}
	otherState, err := oc.GetRun(ctx, runID)
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Stop(); err != nil {
		t.Fatal(err)
	}

	port, err := testserver.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	srv, err := testserver.Start(sqliteArgs(listen, "main.db"), "RUNCAP_WATCH_HEARTBEAT=500ms")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Stop() })

	var rec watchRequests
	c := dial(t, srv.Addr, runcap.WithRetry(patient), rec.option())
	if _, err := c.CreateRun(ctx, runID, 1_000_000); err != nil {
		t.Fatal(err)
	}
	strict := c.Watch(ctx, runID, runcap.WatchReconnect(patient))
	defer strict.Close()
	lenient := c.Watch(ctx, runID, runcap.WatchReconnect(patient), runcap.ResnapshotOnOutOfRange())
	defer lenient.Close()
	for _, s := range []*runcap.WatchStream{strict, lenient} {
		if msg := nextEvent(t, s); msg.GetSnapshot() == nil || msg.GetRevision() != 1 {
			t.Fatalf("first message %v", msg)
		}
	}
	for range 3 {
		if _, err := c.Reserve(ctx, runID, 1_000); err != nil {
			t.Fatal(err)
		}
	}
	var seen string // the digest at revision 4 on this history
	for _, s := range []*runcap.WatchStream{strict, lenient} {
		var msg *runcapv1.WatchResponse
		for range 3 {
			msg = nextEvent(t, s)
		}
		if msg.GetRevision() != 4 || s.LastDigest() != msg.GetEvent().GetState().GetDigest() {
			t.Fatalf("event %v, LastDigest %q", msg, s.LastDigest())
		}
		seen = s.LastDigest()
	}

	// The "failover": the same address now serves the other history.
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	srv, err = testserver.Start(sqliteArgs(listen, "other.db"), "RUNCAP_WATCH_HEARTBEAT=500ms")
	if err != nil {
		t.Fatal(err)
	}

	err = recvErr(t, strict)
	if !runcaperr.IsRevisionOutOfRange(err) || metadata(err)["diverged"] != "true" {
		t.Fatalf("strict stream: %v (metadata %v); want REVISION_OUT_OF_RANGE with diverged=true\nserver log:\n%s", err, metadata(err), srv.Log())
	}
	if rev, _ := strict.LastRevision(); rev != 4 || strict.LastDigest() != seen {
		t.Fatalf("strict stream: LastRevision %d, LastDigest %q; want 4, %q", rev, strict.LastDigest(), seen)
	}

	msg := nextEvent(t, lenient)
	if msg.GetSnapshot() == nil || msg.GetRevision() != 6 || msg.GetSnapshot().GetDigest() != otherState.GetState().GetDigest() {
		t.Fatalf("lenient stream: %v; want a snapshot of the other history at revision 6 (digest %q)", msg, otherState.GetState().GetDigest())
	}
	if lenient.LastDigest() != otherState.GetState().GetDigest() {
		t.Fatalf("lenient stream: LastDigest %q; want %q", lenient.LastDigest(), otherState.GetState().GetDigest())
	}

	// Every resume of both streams sent the digest of revision 4 seen before.
	resumes := 0
	for _, r := range rec.forRun(runID) {
		if r.AfterRevision == nil {
			continue
		}
		resumes++
		if r.GetAfterRevision() != 4 || r.GetAfterDigest() != seen {
			t.Errorf("resume request %v; want after_revision 4 with digest %q", r, seen)
		}
	}
	if resumes < 2 {
		t.Fatalf("%d resume requests; want one per stream at least", resumes)
	}
}
