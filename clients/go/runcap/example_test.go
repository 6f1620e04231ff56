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

// Reserve for an LLM call, priced by the server from its price table, and
// commit the call's actual token usage after it.
func ExampleClient_WithLLMReservation() {
	ctx := context.Background()
	client, err := runcap.Dial(runcap.DefaultTarget)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	llm := runcap.LLMCall{Provider: "openai", Model: "gpt-4o", InputTokens: 1_200, MaxOutputTokens: 500}
	err = client.WithLLMReservation(ctx, "run-42", llm, func(ctx context.Context, h *runcap.Hold) error {
		log.Printf("holding %d micros (price table %s)", h.AmountMicros(), h.Estimate().GetPriceTableVersion())
		if _, err := callTheModel(ctx, llm.Model); err != nil {
			return err // the hold is refunded
		}
		h.SetUsage(runcap.TokenUsage{InputTokens: 1_200, OutputTokens: 310}) // priced at the hold's rates
		return nil
	})
	switch {
	case errors.Is(err, runcap.ErrUnknownPrice):
		log.Print("the server has no price for this model: check its name")
	case errors.Is(err, runcap.ErrBudgetBlocked):
		log.Print("out of budget: stop or downshift")
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
