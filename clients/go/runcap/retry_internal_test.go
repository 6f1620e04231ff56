package runcap

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/runcap/runcap/clients/go/runcaperr"
)

func TestRetryPolicyDelay(t *testing.T) {
	p := RetryPolicy{MaxAttempts: 4, InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, Multiplier: 2}
	for retry, ceiling := range map[int]time.Duration{1: 100 * time.Millisecond, 2: 200 * time.Millisecond, 3: 400 * time.Millisecond, 10: time.Second} {
		for range 50 {
			if d := p.Backoff(retry); d < ceiling/2 || d > ceiling {
				t.Fatalf("Backoff(%d) = %v; want within [%v, %v]", retry, d, ceiling/2, ceiling)
			}
		}
	}
	unavailable := &runcaperr.Error{Code: codes.Unavailable}
	if _, ok := p.delay(1, unavailable); !ok {
		t.Fatal("UNAVAILABLE on attempt 1 must be retried")
	}
	if _, ok := p.delay(4, unavailable); ok {
		t.Fatal("attempts are spent after 4")
	}
	if _, ok := p.delay(1, &runcaperr.Error{Code: codes.NotFound}); ok {
		t.Fatal("NOT_FOUND must not be retried")
	}
	hinted := &runcaperr.Error{Code: codes.Unavailable, HasRetryDelay: true, RetryDelay: 700 * time.Millisecond}
	if d, _ := p.delay(1, hinted); d != 700*time.Millisecond {
		t.Fatalf("the server's RetryInfo delay must win when longer: %v", d)
	}
	hinted.RetryDelay = time.Hour
	if d, _ := p.delay(1, hinted); d != time.Second {
		t.Fatalf("the RetryInfo delay is capped at MaxBackoff: %v", d)
	}
	if _, ok := NoRetry.delay(1, unavailable); ok {
		t.Fatal("NoRetry retried")
	}
}

func TestNewReservationIDIsRandomHex(t *testing.T) {
	a, b := NewReservationID(), NewReservationID()
	if len(a) != 32 || a == b {
		t.Fatalf("%q, %q", a, b)
	}
}
