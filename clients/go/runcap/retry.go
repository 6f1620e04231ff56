package runcap

import (
	"math"
	"math/rand/v2"
	"time"

	"github.com/runcap/runcap/clients/go/runcaperr"
)

// RetryPolicy is jittered exponential back-off for retrying UNAVAILABLE.
//
// The n-th retry waits a random time between half and all of
// min(MaxBackoff, InitialBackoff * Multiplier^(n-1)), or the server's
// RetryInfo delay when that is longer (capped at MaxBackoff).
type RetryPolicy struct {
	// MaxAttempts is the number of attempts in all, the first included; 1
	// disables retries. For Watch, the number of consecutive failed
	// (re)connects.
	MaxAttempts int
	// InitialBackoff is the ceiling of the first wait.
	InitialBackoff time.Duration
	// MaxBackoff is the ceiling of any wait.
	MaxBackoff time.Duration
	// Multiplier is how much the ceiling grows per retry.
	Multiplier float64
}

// DefaultRetryPolicy is the retry policy of unary calls: 4 attempts, waits
// from 100 ms up to 5 s.
var DefaultRetryPolicy = RetryPolicy{MaxAttempts: 4, InitialBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second, Multiplier: 2}

// DefaultWatchReconnect is the reconnect policy of Watch: up to 10
// consecutive failed connects (about 20 seconds of back-off) before the
// error reaches the caller.
var DefaultWatchReconnect = RetryPolicy{MaxAttempts: 10, InitialBackoff: 100 * time.Millisecond, MaxBackoff: 5 * time.Second, Multiplier: 2}

// NoRetry never retries.
var NoRetry = RetryPolicy{MaxAttempts: 1}

// Backoff returns the jittered wait before retry number retry (1-based).
func (p RetryPolicy) Backoff(retry int) time.Duration {
	mult := p.Multiplier
	if mult < 1 {
		mult = 1
	}
	ceiling := float64(p.InitialBackoff) * math.Pow(mult, float64(retry-1))
	if p.MaxBackoff > 0 {
		ceiling = math.Min(ceiling, float64(p.MaxBackoff))
	}
	if ceiling <= 0 {
		return 0
	}
	return time.Duration(ceiling/2 + rand.Float64()*ceiling/2)
}

// delay returns how long to wait before retrying after failed attempt
// attempt (1-based), and false when err is final or the attempts are spent.
func (p RetryPolicy) delay(attempt int, err *runcaperr.Error) (time.Duration, bool) {
	if err == nil || !err.Retryable() || attempt >= p.MaxAttempts {
		return 0, false
	}
	wait := p.Backoff(attempt)
	if err.HasRetryDelay {
		hint := err.RetryDelay
		if p.MaxBackoff > 0 && hint > p.MaxBackoff {
			hint = p.MaxBackoff
		}
		wait = max(wait, hint)
	}
	return wait, true
}
