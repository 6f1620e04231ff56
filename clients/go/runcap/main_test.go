package runcap_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/runcap/runcap/clients/go/internal/testserver"
	"github.com/runcap/runcap/clients/go/runcap"
)

// addr is the shared live server (memory backend) of this package's tests.
var addr string

func TestMain(m *testing.M) {
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

// fastReconnect keeps gRPC's own connection back-off short, so that a
// restarted server is found quickly.
var fastReconnect = runcap.WithDialOptions(grpc.WithConnectParams(grpc.ConnectParams{
	Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond},
	MinConnectTimeout: 2 * time.Second,
}))

func dial(t *testing.T, target string, opts ...runcap.Option) *runcap.Client {
	t.Helper()
	c, err := runcap.Dial(target, append([]runcap.Option{fastReconnect}, opts...)...)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// newRun creates a run with a unique id.
func newRun(t *testing.T, c *runcap.Client, limit int64, opts ...runcap.RunOption) string {
	t.Helper()
	id := "go-" + runcap.NewReservationID()[:12]
	if _, err := c.CreateRun(testContext(t), id, limit, opts...); err != nil {
		t.Fatalf("CreateRun(%s): %v", id, err)
	}
	return id
}
