package runcap

import (
	"google.golang.org/protobuf/proto"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
)

// LLMCall describes an LLM call to reserve for (ReserveLLM, HoldLLM,
// WithLLMReservation). The server prices it from its price table: the input
// tokens at the input price plus the effective maximum output at the output
// price.
type LLMCall struct {
	// Provider is the provider, as in the price table ("openai",
	// "anthropic"...).
	Provider string
	// Model is the model id, exactly as in the price table.
	Model string
	// InputTokens is the prompt's input tokens (zero or more).
	InputTokens int64
	// MaxOutputTokens is the call's maximum output tokens (its max_tokens).
	// Zero leaves it unset: the server's default applies, or the request is
	// refused when the server has none.
	MaxOutputTokens int64

	// What the call needs from a model decides which models can stand in
	// for it: the Alternatives of a block, and the cheaper model a run with
	// RunPolicy.AutoDowngrade holds instead (DECISION_DOWNGRADE).

	// NeedsTools says the call uses tool (function) calling.
	NeedsTools bool
	// NeedsJSONSchema says the call uses JSON-schema structured output.
	NeedsJSONSchema bool
	// MinContextTokens is the context window the call needs at least, in
	// tokens. Zero leaves it unset: no minimum (a stand-in always needs room
	// for the input tokens).
	MinContextTokens int64
	// Modalities are the input modalities beyond text the call uses
	// ("image", "audio", "video").
	Modalities []string
	// CandidateModels are the models the caller can use instead, as
	// "provider/model" (a gateway's served models, say): alternatives and
	// downgrades come only from these. Empty: any.
	CandidateModels []string
}

// Proto returns the runcapv1.LlmCall message of the call.
func (c LLMCall) Proto() *runcapv1.LlmCall {
	m := &runcapv1.LlmCall{
		Provider:        c.Provider,
		Model:           c.Model,
		InputTokens:     c.InputTokens,
		NeedsTools:      c.NeedsTools,
		NeedsJsonSchema: c.NeedsJSONSchema,
	}
	if c.MaxOutputTokens != 0 {
		m.MaxOutputTokens = proto.Int64(c.MaxOutputTokens)
	}
	if c.MinContextTokens != 0 {
		m.MinContextTokens = proto.Int64(c.MinContextTokens)
	}
	if len(c.Modalities) > 0 {
		m.Modalities = append([]string(nil), c.Modalities...)
	}
	if len(c.CandidateModels) > 0 {
		m.CandidateModels = append([]string(nil), c.CandidateModels...)
	}
	return m
}

// TokenUsage is an LLM call's actual usage, in disjoint token classes, to
// commit a reservation made for an LLMCall (CommitUsage, Hold.CommitUsage,
// Hold.SetUsage). The server prices it at the reservation's own rates.
type TokenUsage struct {
	// InputTokens are billed at the input price (not read from or written to
	// a cache).
	InputTokens int64
	// OutputTokens are the visible output tokens, not counting reasoning
	// tokens.
	OutputTokens int64
	// CacheReadTokens are input tokens read from the prompt cache.
	CacheReadTokens int64
	// CacheWriteTokens are input tokens written to the prompt cache.
	CacheWriteTokens int64
	// ReasoningTokens are reasoning (thinking) output tokens.
	ReasoningTokens int64
}

// Proto returns the runcapv1.TokenUsage message of the usage.
func (u TokenUsage) Proto() *runcapv1.TokenUsage {
	return &runcapv1.TokenUsage{
		InputTokens:      u.InputTokens,
		OutputTokens:     u.OutputTokens,
		CacheReadTokens:  u.CacheReadTokens,
		CacheWriteTokens: u.CacheWriteTokens,
		ReasoningTokens:  u.ReasoningTokens,
	}
}
