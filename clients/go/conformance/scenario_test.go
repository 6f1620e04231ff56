package conformance_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/runcap/runcap/clients/go/internal/testserver"
	"github.com/runcap/runcap/clients/go/runcap"
	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

const (
	// targetEnv names an already running server to run the scenario against.
	targetEnv = "RUNCAP_CONFORMANCE_TARGET"
	// scenarioEnv names another scenario file.
	scenarioEnv = "RUNCAP_CONFORMANCE_SCENARIO"
	// scenarioPath is the shared scenario, relative to the repository root.
	scenarioPath = "tests/conformance/scenario.json"
	// stepTimeout bounds each step, so that a watch waiting for an event
	// that never comes fails instead of hanging.
	stepTimeout = 15 * time.Second
)

// addr is the server the scenario runs against.
var addr string

func TestMain(m *testing.M) {
	if target := os.Getenv(targetEnv); target != "" {
		addr = target
		os.Exit(m.Run())
	}
	srv, err := testserver.Start(
		[]string{"--listen", "127.0.0.1:0", "--backend", "memory"},
		"RUNCAP_WATCH_HEARTBEAT=500ms",
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	addr = srv.Addr
	code := m.Run()
	if err := srv.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	os.Exit(code)
}

// TestScenario runs every step of the shared scenario in order through the
// public Go client, and stops at the first step that fails (later steps
// build on it).
func TestScenario(t *testing.T) {
	path := findScenario(t)
	sc := loadScenario(t, path)
	t.Logf("scenario %s (%d steps) against %s", path, len(sc.Steps), addr)

	client, err := runcap.Dial(addr)
	if err != nil {
		t.Fatalf("Dial(%s): %v", addr, err)
	}
	defer client.Close()

	d := &driver{client: client, vars: map[string]string{}}
	for i, raw := range sc.Steps {
		st, err := newStep(i+1, raw)
		if err != nil {
			t.Fatalf("step %d: %v", i+1, err)
		}
		ok := t.Run(fmt.Sprintf("%02d_%s", st.index, st.name), func(t *testing.T) {
			st.t = t
			ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
			defer cancel()
			d.run(ctx, st)
		})
		if !ok {
			t.Fatalf("step %d %q failed; the steps after it were not run", st.index, st.name)
		}
	}
}

// --- loading -------------------------------------------------------------

type scenario struct {
	About string           `json:"about"`
	Steps []map[string]any `json:"steps"`
}

// findScenario returns $RUNCAP_CONFORMANCE_SCENARIO, or the scenario in the
// nearest directory above the working directory that has one.
func findScenario(t *testing.T) string {
	t.Helper()
	if p := os.Getenv(scenarioEnv); p != "" {
		return p
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		p := filepath.Join(dir, filepath.FromSlash(scenarioPath))
		if _, err := os.Stat(p); err == nil {
			return p
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("no %s in any directory above the working directory; set %s", scenarioPath, scenarioEnv)
		}
		dir = parent
	}
}

// loadScenario decodes the scenario with every number kept as a
// json.Number, so that money is read as an exact int64.
func loadScenario(t *testing.T, path string) scenario {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.UseNumber()
	dec.DisallowUnknownFields()
	var sc scenario
	if err := dec.Decode(&sc); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		t.Fatalf("%s: data after the scenario object", path)
	}
	if len(sc.Steps) == 0 {
		t.Fatalf("%s: no steps", path)
	}
	return sc
}

// --- one step --------------------------------------------------------------

// step is one step of the scenario: its arguments and its expectations,
// each of which must be used by the driver (an argument or expectation it
// does not know fails the step rather than being ignored).
type step struct {
	t      *testing.T
	index  int
	name   string
	op     string
	args   map[string]any
	expect map[string]any
	used   map[string]bool // args and expect keys read, as "arg:k" / "expect:k"
}

func newStep(index int, raw map[string]any) (*step, error) {
	st := &step{index: index, args: map[string]any{}, used: map[string]bool{}}
	var ok bool
	if st.name, ok = raw["name"].(string); !ok || st.name == "" {
		return nil, errors.New(`no "name"`)
	}
	if st.op, ok = raw["op"].(string); !ok || st.op == "" {
		return nil, fmt.Errorf("%q: no \"op\"", st.name)
	}
	if st.expect, ok = raw["expect"].(map[string]any); !ok {
		return nil, fmt.Errorf("%q: no \"expect\" object", st.name)
	}
	for k, v := range raw {
		if k != "name" && k != "op" && k != "expect" {
			st.args[k] = v
		}
	}
	return st, nil
}

// errorf reports a failed expectation, naming the step.
func (s *step) errorf(format string, args ...any) {
	s.t.Helper()
	s.t.Errorf("step %d %q (%s): %s", s.index, s.name, s.op, fmt.Sprintf(format, args...))
}

// fatalf reports a failure after which the step cannot go on.
func (s *step) fatalf(format string, args ...any) {
	s.t.Helper()
	s.t.Fatalf("step %d %q (%s): %s", s.index, s.name, s.op, fmt.Sprintf(format, args...))
}

func (s *step) arg(key string) (any, bool) {
	v, ok := s.args[key]
	s.used["arg:"+key] = true
	return v, ok
}

func (s *step) str(d *driver, key string) string {
	s.t.Helper()
	v, ok := s.arg(key)
	if !ok {
		s.fatalf("argument %q is missing", key)
	}
	str, ok := v.(string)
	if !ok {
		s.fatalf("argument %q is %T, not a string", key, v)
	}
	return d.resolve(str)
}

func (s *step) int(key string) int64 {
	s.t.Helper()
	n, ok := s.optInt(key)
	if !ok {
		s.fatalf("argument %q is missing", key)
	}
	return n
}

func (s *step) optInt(key string) (int64, bool) {
	s.t.Helper()
	v, ok := s.arg(key)
	if !ok {
		return 0, false
	}
	n, err := asInt(v)
	if err != nil {
		s.fatalf("argument %q: %v", key, err)
	}
	return n, true
}

func (s *step) labels(d *driver, key string) (map[string]string, bool) {
	s.t.Helper()
	v, ok := s.arg(key)
	if !ok {
		return nil, false
	}
	m, err := asStringMap(v)
	if err != nil {
		s.fatalf("argument %q: %v", key, err)
	}
	for k, v := range m {
		m[k] = d.resolve(v)
	}
	return m, true
}

// want returns the expectation key, marking it checked.
func (s *step) want(key string) (any, bool) {
	v, ok := s.expect[key]
	s.used["expect:"+key] = true
	return v, ok
}

// leftovers fails the step for every argument or expectation the driver did
// not read: the scenario asks for something this driver does not do.
func (s *step) leftovers() {
	s.t.Helper()
	for _, k := range sortedKeys(s.args) {
		if !s.used["arg:"+k] {
			s.errorf("argument %q is not known to the Go driver for op %q", k, s.op)
		}
	}
	for _, k := range sortedKeys(s.expect) {
		if !s.used["expect:"+k] {
			s.errorf("expectation %q is not known to the Go driver for op %q", k, s.op)
		}
	}
}

// --- the driver -------------------------------------------------------------

type driver struct {
	client *runcap.Client
	vars   map[string]string // "$run" -> this execution's run id
}

// resolve replaces a variable ($name) by its value, a fresh run id made on
// first use; other strings are returned as they are.
func (d *driver) resolve(s string) string {
	if !strings.HasPrefix(s, "$") {
		return s
	}
	if v, ok := d.vars[s]; ok {
		return v
	}
	v := "go-" + strings.TrimPrefix(s, "$") + "-" + runcap.NewReservationID()[:12]
	d.vars[s] = v
	return v
}

func (d *driver) run(ctx context.Context, s *step) {
	switch s.op {
	case "create_run":
		runID, limit := s.str(d, "run_id"), s.int("limit_micros")
		var opts []runcap.RunOption
		if labels, ok := s.labels(d, "labels"); ok {
			opts = append(opts, runcap.Labels(labels))
		}
		resp, err := d.client.CreateRun(ctx, runID, limit, opts...)
		d.checkUnary(s, resp, err)
	case "get_run":
		resp, err := d.client.GetRun(ctx, s.str(d, "run_id"))
		d.checkUnary(s, resp, err)
	case "reserve":
		runID, resID, amount := s.str(d, "run_id"), s.str(d, "reservation_id"), s.int("amount_micros")
		opts := []runcap.ReserveOption{runcap.ReservationID(resID)}
		if ms, ok := s.optInt("ttl_ms"); ok {
			opts = append(opts, runcap.TTL(time.Duration(ms)*time.Millisecond))
		}
		resp, err := d.client.Reserve(ctx, runID, amount, opts...)
		d.checkUnary(s, resp, err)
	case "commit":
		resp, err := d.client.Commit(ctx, s.str(d, "run_id"), s.str(d, "reservation_id"), s.int("actual_micros"))
		d.checkUnary(s, resp, err)
	case "refund":
		resp, err := d.client.Refund(ctx, s.str(d, "run_id"), s.str(d, "reservation_id"))
		d.checkUnary(s, resp, err)
	case "close_run":
		resp, err := d.client.CloseRun(ctx, s.str(d, "run_id"))
		d.checkUnary(s, resp, err)
	case "reserve_concurrently":
		d.reserveConcurrently(ctx, s)
	case "watch":
		d.watch(ctx, s)
	case "watch_snapshot":
		d.watchSnapshot(ctx, s)
	case "watch_resume":
		d.watchResume(ctx, s)
	default:
		s.fatalf("unknown op %q", s.op)
	}
	s.leftovers()
}

// checkOutcome checks err against the "error" expectation (or its absence)
// and reports whether the call succeeded as expected, so that the response
// is checked next.
func checkOutcome(s *step, err error) bool {
	s.t.Helper()
	wantErr, ok := s.want("error")
	if !ok {
		if err != nil {
			s.errorf("unexpected error: %v", err)
			return false
		}
		return true
	}
	if err == nil {
		s.errorf("succeeded; want error %v", wantErr)
		return false
	}
	checkError(s, wantErr, err)
	// An error step expects nothing else: any other expectation is left
	// unread, and so reported by leftovers.
	return false
}

// checkError compares a failure with {"code", "reason", "field_violations"}.
func checkError(s *step, want any, err error) {
	s.t.Helper()
	exp, ok := want.(map[string]any)
	if !ok {
		s.fatalf(`"error" expectation is %T, not an object`, want)
	}
	var rerr *runcaperr.Error
	if !errors.As(err, &rerr) {
		s.errorf("error %v (%T) is not a *runcaperr.Error", err, err)
		return
	}
	for _, k := range sortedKeys(exp) {
		v := exp[k]
		switch k {
		case "code":
			name, _ := v.(string)
			var code codes.Code
			if uerr := code.UnmarshalJSON([]byte(`"` + name + `"`)); uerr != nil || name == "" {
				s.fatalf("error code %v is not a gRPC code name", v)
			}
			if rerr.Code != code {
				s.errorf("error code %s; want %s (%v)", rerr.Code, name, rerr)
			}
		case "reason":
			if rerr.ReasonName != v {
				s.errorf("error reason %q; want %v (%v)", rerr.ReasonName, v, rerr)
			}
		case "field_violations":
			wantFields, cerr := asStrings(v)
			if cerr != nil {
				s.fatalf("field_violations: %v", cerr)
			}
			var got []string
			for _, fv := range rerr.FieldViolations {
				got = append(got, fv.Field)
			}
			slices.Sort(got)
			if !slices.Equal(got, wantFields) {
				s.errorf("field violations %q; want %q (%v)", got, wantFields, rerr)
			}
		default:
			s.errorf("error expectation %q is not known to the Go driver", k)
		}
	}
}

// checkUnary checks the outcome of a unary call and then every other
// expectation against the response: "state" against its BudgetState,
// "labels" against its run's labels, and any other key against the
// response field of that name.
func (d *driver) checkUnary(s *step, resp proto.Message, err error) {
	s.t.Helper()
	if !checkOutcome(s, err) {
		return
	}
	m := resp.ProtoReflect()
	for _, k := range sortedKeys(s.expect) {
		if k == "error" {
			continue
		}
		want, _ := s.want(k)
		switch k {
		case "labels":
			run := subMessage(s, m, "run")
			if run == nil {
				continue
			}
			checkField(s, "run.labels", run, "labels", want)
		default:
			checkField(s, k, m, k, want)
		}
	}
}

// subMessage returns the message field name of m, failing the step when m
// has no such field or it is unset.
func subMessage(s *step, m protoreflect.Message, name string) protoreflect.Message {
	s.t.Helper()
	fd := m.Descriptor().Fields().ByName(protoreflect.Name(name))
	if fd == nil || fd.Message() == nil || fd.IsList() || fd.IsMap() {
		s.errorf("%s has no message field %q", m.Descriptor().FullName(), name)
		return nil
	}
	if !m.Has(fd) {
		s.errorf("%s.%s is not set", m.Descriptor().FullName(), name)
		return nil
	}
	return m.Get(fd).Message()
}

// checkField compares field name of m with want: an object for a message
// (only the fields it lists), an object of strings for a map, a number,
// bool, string or enum value name for a scalar.
func checkField(s *step, path string, m protoreflect.Message, name string, want any) {
	s.t.Helper()
	fd := m.Descriptor().Fields().ByName(protoreflect.Name(name))
	if fd == nil {
		s.errorf("expectation %q: %s has no field %q", path, m.Descriptor().FullName(), name)
		return
	}
	switch {
	case fd.IsMap():
		wantMap, err := asStringMap(want)
		if err != nil {
			s.errorf("expectation %q: %v", path, err)
			return
		}
		got := map[string]string{}
		m.Get(fd).Map().Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
			got[k.String()] = v.String()
			return true
		})
		if !maps.Equal(got, wantMap) {
			s.errorf("%s = %v; want %v", path, got, wantMap)
		}
	case fd.IsList():
		s.errorf("expectation %q: list fields are not supported", path)
	case fd.Message() != nil:
		sub := subMessage(s, m, name)
		if sub == nil {
			return
		}
		obj, ok := want.(map[string]any)
		if !ok {
			s.errorf("expectation %q is %T, not an object", path, want)
			return
		}
		for _, k := range sortedKeys(obj) {
			checkField(s, path+"."+k, sub, k, obj[k])
		}
	default:
		got, err := scalar(fd, m.Get(fd))
		if err != nil {
			s.errorf("expectation %q: %v", path, err)
			return
		}
		if !scalarEqual(got, want) {
			s.errorf("%s = %v; want %v", path, got, want)
		}
	}
}

// scalar returns a scalar field's value as the scenario spells it: int64,
// bool, string, or the enum value's name (its generated String()).
func scalar(fd protoreflect.FieldDescriptor, v protoreflect.Value) (any, error) {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return v.Bool(), nil
	case protoreflect.Int32Kind, protoreflect.Int64Kind, protoreflect.Sint32Kind, protoreflect.Sint64Kind,
		protoreflect.Sfixed32Kind, protoreflect.Sfixed64Kind:
		return v.Int(), nil
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return int64(v.Uint()), nil
	case protoreflect.StringKind:
		return v.String(), nil
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByNumber(v.Enum()); ev != nil {
			return string(ev.Name()), nil
		}
		return fmt.Sprint(int32(v.Enum())), nil
	}
	return nil, fmt.Errorf("field %s of kind %s is not supported", fd.FullName(), fd.Kind())
}

func scalarEqual(got, want any) bool {
	switch g := got.(type) {
	case int64:
		n, err := asInt(want)
		return err == nil && n == g
	case bool:
		w, ok := want.(bool)
		return ok && w == g
	case string:
		w, ok := want.(string)
		return ok && w == g
	}
	return false
}

// --- concurrent reserves ---------------------------------------------------

func (d *driver) reserveConcurrently(ctx context.Context, s *step) {
	runID, count, amount := s.str(d, "run_id"), s.int("count"), s.int("amount_micros")
	prefix := s.str(d, "id_prefix")
	if count < 1 || count > 10_000 {
		s.fatalf("count %d out of range", count)
	}
	type result struct {
		resp *runcapv1.ReserveResponse
		err  error
	}
	results := make([]result, count)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range count {
		wg.Go(func() {
			<-start
			resp, err := d.client.Reserve(ctx, runID, amount, runcap.ReservationID(fmt.Sprintf("%s%d", prefix, i)))
			results[i] = result{resp, err}
		})
	}
	close(start)
	wg.Wait()

	var allowed, blocked int64
	wantReason, hasReason := s.want("block_reason")
	for i, r := range results {
		id := fmt.Sprintf("%s%d", prefix, i)
		if r.err != nil {
			s.errorf("reserve %s: %v", id, r.err)
			continue
		}
		switch r.resp.GetDecision() {
		case runcapv1.Decision_DECISION_ALLOW:
			allowed++
		case runcapv1.Decision_DECISION_BLOCK:
			blocked++
			if hasReason && r.resp.GetReason().String() != wantReason {
				s.errorf("reserve %s blocked with %s; want %v", id, r.resp.GetReason(), wantReason)
			}
		default:
			s.errorf("reserve %s: decision %s", id, r.resp.GetDecision())
		}
	}
	for _, c := range []struct {
		key string
		got int64
	}{{"allowed", allowed}, {"blocked", blocked}} {
		if want, ok := s.want(c.key); ok && !scalarEqual(c.got, want) {
			s.errorf("%s = %d; want %v", c.key, c.got, want)
		}
	}
	if want, ok := s.want("state"); ok {
		resp, err := d.client.GetRun(ctx, runID)
		if err != nil {
			s.errorf("GetRun after the reserves: %v", err)
			return
		}
		checkField(s, "state", resp.ProtoReflect(), "state", want)
	}
}

// --- watches ----------------------------------------------------------------

// collect receives events from stream until one reaches revision until,
// or limit events (when limit > 0) were received, skipping progress
// heartbeats; a snapshot is an error (the stream was opened after a
// revision). It returns the events received and the error
// that ended the stream early, if any.
func collect(s *step, stream *runcap.WatchStream, until int64, limit int) ([]*runcapv1.WatchResponse, error) {
	s.t.Helper()
	var events []*runcapv1.WatchResponse
	for {
		msg, err := stream.Recv()
		if err != nil {
			return events, err
		}
		switch {
		case msg.GetProgress() != nil:
			continue
		case msg.GetEvent() == nil:
			s.errorf("got %v; want only events after a revision", msg)
			continue
		}
		if st := msg.GetEvent().GetState(); st.GetRevision() != msg.GetRevision() {
			s.errorf("event at revision %d carries a state at revision %d", msg.GetRevision(), st.GetRevision())
		}
		events = append(events, msg)
		if msg.GetRevision() >= until || (limit > 0 && len(events) >= limit) {
			return events, nil
		}
	}
}

// checkEvents compares events with the "revisions" and "event_types"
// expectations.
func checkEvents(s *step, events []*runcapv1.WatchResponse) {
	s.t.Helper()
	var revs []int64
	var types []string
	for _, e := range events {
		revs = append(revs, e.GetRevision())
		types = append(types, e.GetEvent().GetType().String())
	}
	if want, ok := s.want("revisions"); ok {
		wantRevs, err := asInts(want)
		if err != nil {
			s.fatalf("revisions: %v", err)
		}
		if !slices.Equal(revs, wantRevs) {
			s.errorf("revisions %v; want %v", revs, wantRevs)
		}
	}
	if want, ok := s.want("event_types"); ok {
		wantTypes, err := asStrings(want)
		if err != nil {
			s.fatalf("event_types: %v", err)
		}
		if !slices.Equal(types, wantTypes) {
			s.errorf("event types %v; want %v", types, wantTypes)
		}
	}
}

func (d *driver) watch(ctx context.Context, s *step) {
	runID, after, until := s.str(d, "run_id"), s.int("after_revision"), s.int("until_revision")
	stream := d.client.Watch(ctx, runID, runcap.AfterRevision(after))
	defer stream.Close()
	events, err := collect(s, stream, until, 0)
	if !checkOutcome(s, err) {
		return
	}
	checkEvents(s, events)
}

func (d *driver) watchSnapshot(ctx context.Context, s *step) {
	runID := s.str(d, "run_id")
	stream := d.client.Watch(ctx, runID)
	defer stream.Close()
	msg, err := stream.Recv()
	if !checkOutcome(s, err) {
		return
	}
	snap := msg.GetSnapshot()
	if snap == nil {
		s.errorf("first message %v; want a snapshot", msg)
		return
	}
	if snap.GetRevision() != msg.GetRevision() {
		s.errorf("snapshot at revision %d carries a state at revision %d", msg.GetRevision(), snap.GetRevision())
	}
	if want, ok := s.want("revision"); ok && !scalarEqual(msg.GetRevision(), want) {
		s.errorf("snapshot revision %d; want %v", msg.GetRevision(), want)
	}
	if want, ok := s.want("state"); ok {
		obj, isObj := want.(map[string]any)
		if !isObj {
			s.fatalf(`"state" expectation is %T, not an object`, want)
		}
		for _, k := range sortedKeys(obj) {
			checkField(s, "state."+k, snap.ProtoReflect(), k, obj[k])
		}
	}
}

// watchResume reads disconnect_after events, closes the stream, watches
// again after the last revision the first stream delivered, and checks that
// the two streams together delivered each revision exactly once, in order.
func (d *driver) watchResume(ctx context.Context, s *step) {
	runID, after, until := s.str(d, "run_id"), s.int("after_revision"), s.int("until_revision")
	disconnectAfter := s.int("disconnect_after")
	if disconnectAfter < 1 {
		s.fatalf("disconnect_after %d must be positive", disconnectAfter)
	}

	first := d.client.Watch(ctx, runID, runcap.AfterRevision(after))
	events, err := collect(s, first, until, int(disconnectAfter))
	first.Close()
	if !checkOutcome(s, err) {
		return
	}
	if int64(len(events)) != disconnectAfter {
		s.errorf("first stream delivered %d events; want %d before the disconnect", len(events), disconnectAfter)
		return
	}
	last, ok := first.LastRevision()
	if !ok || last != events[len(events)-1].GetRevision() {
		s.errorf("LastRevision() = %d, %v; want %d", last, ok, events[len(events)-1].GetRevision())
		return
	}
	if _, err := first.Recv(); !errors.Is(err, context.Canceled) {
		s.errorf("Recv after Close = %v; want context.Canceled", err)
	}

	if last < until {
		second := d.client.Watch(ctx, runID, runcap.AfterRevision(last))
		defer second.Close()
		more, err := collect(s, second, until, 0)
		if err != nil {
			s.errorf("resumed watch after revision %d: %v", last, err)
			return
		}
		events = append(events, more...)
	}
	checkEvents(s, events)
}

// --- JSON helpers ------------------------------------------------------------

// asInt reads an exact int64 from a json.Number (never through a float).
func asInt(v any) (int64, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("%v (%T) is not a number", v, v)
	}
	i, err := n.Int64()
	if err != nil {
		return 0, fmt.Errorf("%s is not an int64", n)
	}
	return i, nil
}

func asInts(v any) ([]int64, error) {
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%v (%T) is not a list", v, v)
	}
	out := make([]int64, 0, len(list))
	for _, e := range list {
		n, err := asInt(e)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

func asStrings(v any) ([]string, error) {
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%v (%T) is not a list", v, v)
	}
	out := make([]string, 0, len(list))
	for _, e := range list {
		s, ok := e.(string)
		if !ok {
			return nil, fmt.Errorf("%v (%T) is not a string", e, e)
		}
		out = append(out, s)
	}
	return out, nil
}

func asStringMap(v any) (map[string]string, error) {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("%v (%T) is not an object", v, v)
	}
	out := make(map[string]string, len(obj))
	for k, e := range obj {
		s, ok := e.(string)
		if !ok {
			return nil, fmt.Errorf("%q: %v (%T) is not a string", k, e, e)
		}
		out[k] = s
	}
	return out, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
