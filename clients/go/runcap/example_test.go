package runcap_test

import (
	"context"
	"errors"
	"log"

	"github.com/runcap/runcap/clients/go/runcap"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

func callTheModel(context.Context, string) (costMicros int64, err error) { return 1_200, nil }

// Reserve before a paid call, commit its actual cost after; an error refunds.
func ExampleClient_WithReservation() {
	ctx := context.Background()
	client, err := runcap.Dial(runcap.DefaultTarget)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	err = client.WithReservation(ctx, "run-42", 50_000, func(ctx context.Context, h *runcap.Hold) error {
		cost, err := callTheModel(ctx, "big-model")
		if err != nil {
			return err // the hold is refunded
		}
		h.SetActual(cost) // committed when the func returns
		return nil
	})
	switch {
	case errors.Is(err, runcap.ErrBudgetBlocked):
		log.Print("out of budget: stop or downshift")
	case runcaperr.IsRunNotFound(err):
		log.Print("create the run first")
	case err != nil:
		log.Fatal(err)
	}
}

// Watch a run and downshift the model when the remaining budget runs low.
// The stream resumes by itself across disconnects and server restarts.
func ExampleClient_Watch() {
	ctx := context.Background()
	client, err := runcap.Dial(runcap.DefaultTarget)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	model := "big-model"
	for msg, err := range client.Watch(ctx, "run-42").All() {
		if err != nil {
			log.Fatal(err)
		}
		state := msg.GetSnapshot()
		if state == nil {
			state = msg.GetEvent().GetState()
		}
		if state != nil && state.GetRemainingMicros() < 100_000 && model != "small-model" {
			model = "small-model"
			log.Printf("revision %d: %d micros left, downshifting to %s", msg.GetRevision(), state.GetRemainingMicros(), model)
		}
	}
}
