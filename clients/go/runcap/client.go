// Package runcap is the Go client of the runcap budget authority.
//
// Ask before every paid call, tell after:
//
//	client, err := runcap.Dial("127.0.0.1:50051")
//	...
//	err = client.WithReservation(ctx, runID, 50_000, func(ctx context.Context, h *runcap.Hold) error {
//		cost, err := callTheModel(ctx)
//		if err != nil {
//			return err // the hold is refunded
//		}
//		h.SetActual(cost) // committed when the func returns
//		return nil
//	})
//	if errors.Is(err, runcap.ErrBudgetBlocked) { ... downshift or stop ... }
//
// For an LLM call, ReserveLLM, HoldLLM and WithLLMReservation let the server
// price an LLMCall, and CommitUsage and Hold.SetUsage commit its TokenUsage.
//
// The generated stubs and messages are in package
// github.com/runcap/runcap/clients/go/runcap/v1 (runcapv1); failed calls
// return a *runcaperr.Error (package github.com/runcap/runcap/clients/go/runcaperr)
// with the server's code, reason and details. A block decision is not an
// error for Reserve: it is in the response. Only Hold and WithReservation,
// which need a hold to go on, turn it into a *BudgetBlockedError (a
// throttle into a *BudgetThrottledError, with the delay before reserving
// again; a call that needs approval into an *ApprovalRequiredError, with
// the ApprovalID to Approve or Deny). A run's Policy is set at CreateRun (a
// root run given none gets its scopes' default, SetScopePolicy); Meter counts a reservation on
// a call meter. A run whose policy has AutoDowngrade answers an LLM call
// that does not fit with DECISION_DOWNGRADE: the hold is of a cheaper model
// (Hold.Downgraded, Hold.Model). GetDecision returns a decision by its id,
// with the inputs it was made from.
package runcap

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	runcapv1 "github.com/runcap/runcap/clients/go/runcap/v1"
	"github.com/runcap/runcap/clients/go/runcaperr"
)

// DefaultTarget is the address of a runcap server started with its defaults.
const DefaultTarget = "127.0.0.1:50051"

// DefaultTimeout is the default deadline of each unary attempt.
const DefaultTimeout = 10 * time.Second

// Client is a client of the runcap BudgetService. It is safe for concurrent
// use. Every failed call returns a *runcaperr.Error. Calls that are
// idempotent (those that carry a client-side id, the reads, CloseRun,
// SuspendRun, ResumeRun, Approve, Deny and the scope limit and policy calls)
// are retried on UNAVAILABLE according to the client's RetryPolicy.
type Client struct {
	conn    *grpc.ClientConn // nil when the connection is the caller's
	stub    runcapv1.BudgetServiceClient
	timeout time.Duration
	retry   RetryPolicy
	md      metadata.MD
}

type config struct {
	creds    credentials.TransportCredentials
	dialOpts []grpc.DialOption
	timeout  time.Duration
	retry    RetryPolicy
	md       metadata.MD
}

// Option configures a Client.
type Option func(*config)

// WithTransportCredentials makes Dial use TLS (or other) credentials instead
// of a plaintext connection.
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(c *config) { c.creds = creds }
}

// WithDialOptions passes extra options to grpc.NewClient (keepalive, connect
// back-off, interceptors...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(c *config) { c.dialOpts = append(c.dialOpts, opts...) }
}

// WithTimeout sets the deadline of each unary attempt (DefaultTimeout when
// not given); 0 means none beyond the caller's context. Watch streams have
// no deadline.
func WithTimeout(d time.Duration) Option {
	return func(c *config) { c.timeout = d }
}

// WithRetry sets the retry policy of idempotent unary calls
// (DefaultRetryPolicy when not given; NoRetry disables retries).
func WithRetry(p RetryPolicy) Option {
	return func(c *config) { c.retry = p }
}

// WithMetadata sends the given key/value pairs (as for metadata.Pairs) with
// every call, for example "authorization", "Bearer ...".
func WithMetadata(kv ...string) Option {
	return func(c *config) { c.md = metadata.Join(c.md, metadata.Pairs(kv...)) }
}

func newConfig(opts []Option) config {
	c := config{timeout: DefaultTimeout, retry: DefaultRetryPolicy}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// Dial creates a client of the server at target (for example
// "127.0.0.1:50051" or "dns:///runcap.internal:50051") with grpc.NewClient.
// The connection is plaintext unless WithTransportCredentials is given; it
// is opened lazily, so Dial does not fail when the server is down. Close the
// client when done.
func Dial(target string, opts ...Option) (*Client, error) {
	c := newConfig(opts)
	creds := c.creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	dialOpts := append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, c.dialOpts...)
	conn, err := grpc.NewClient(target, dialOpts...)
	if err != nil {
		return nil, err
	}
	cl := newClient(runcapv1.NewBudgetServiceClient(conn), c)
	cl.conn = conn
	return cl, nil
}

// New creates a client over an existing connection, which stays the
// caller's: Close does not close it. Credentials and dial options are
// ignored.
func New(conn grpc.ClientConnInterface, opts ...Option) *Client {
	return newClient(runcapv1.NewBudgetServiceClient(conn), newConfig(opts))
}

func newClient(stub runcapv1.BudgetServiceClient, c config) *Client {
	return &Client{stub: stub, timeout: c.timeout, retry: c.retry, md: c.md}
}

// Close closes the connection Dial opened.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// Stub returns the generated stub, for calls this client does not wrap.
func (c *Client) Stub() runcapv1.BudgetServiceClient { return c.stub }

func (c *Client) outgoing(ctx context.Context) context.Context {
	if len(c.md) == 0 {
		return ctx
	}
	return metadata.NewOutgoingContext(ctx, metadata.Join(outgoingMD(ctx), c.md))
}

func outgoingMD(ctx context.Context) metadata.MD {
	md, _ := metadata.FromOutgoingContext(ctx)
	return md
}

// call runs one unary RPC with the per-attempt timeout, retrying idempotent
// calls on UNAVAILABLE, and returns failures as *runcaperr.Error.
func call[Req, Resp any](
	ctx context.Context, c *Client, idempotent bool,
	method func(context.Context, Req, ...grpc.CallOption) (Resp, error), req Req,
) (Resp, error) {
	ctx = c.outgoing(ctx)
	for attempt := 1; ; attempt++ {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if c.timeout > 0 {
			actx, cancel = context.WithTimeout(ctx, c.timeout)
		}
		resp, err := method(actx, req)
		cancel()
		if err == nil {
			return resp, nil
		}
		var zero Resp
		if ctx.Err() != nil {
			return zero, ctx.Err()
		}
		rerr := runcaperr.FromError(err)
		if rerr == nil {
			return zero, err
		}
		delay, retry := c.retry.delay(attempt, rerr)
		if !idempotent || !retry {
			return zero, rerr
		}
		if err := sleep(ctx, delay); err != nil {
			return zero, err
		}
	}
}

// CreateRun creates a run with a ceiling of limitMicros, or returns it (with
// Replayed set) when it exists with the same arguments. With an empty runID
// the server picks one, and the call is not retried. Options set labels, the
// default ttl, the run's Policy and the parent scopes (ParentRunID, APIKeyID,
// UserID, TeamID):
//
//	client.CreateRun(ctx, "sub-1", 1_000_000, runcap.ParentRunID("run-42"), runcap.TeamID("team-7"))
func (c *Client) CreateRun(ctx context.Context, runID string, limitMicros int64, opts ...RunOption) (*runcapv1.CreateRunResponse, error) {
	req := &runcapv1.CreateRunRequest{RunId: runID, LimitMicros: limitMicros}
	for _, o := range opts {
		o(req)
	}
	return call(ctx, c, runID != "", c.stub.CreateRun, req)
}

// RunOption sets an optional field of CreateRun.
type RunOption func(*runcapv1.CreateRunRequest)

// Labels sets the run's labels (agent, team, feature...).
func Labels(labels map[string]string) RunOption {
	return func(r *runcapv1.CreateRunRequest) {
		if r.Labels == nil {
			r.Labels = make(map[string]string, len(labels))
		}
		for k, v := range labels {
			r.Labels[k] = v
		}
	}
}

// DefaultTTL sets the run's default reservation ttl (whole milliseconds).
func DefaultTTL(d time.Duration) RunOption {
	return func(r *runcapv1.CreateRunRequest) { r.DefaultTtl = durationpb.New(d) }
}

// ParentRunID makes the run a subagent of the run parentRunID: each of its
// reservations is also held on the parent and on every ancestor, so a
// parent's limit covers its whole tree. The parent must exist and be open.
func ParentRunID(parentRunID string) RunOption {
	return func(r *runcapv1.CreateRunRequest) { r.ParentRunId = parentRunID }
}

// APIKeyID charges the run to an API key as well (inherited from the parent
// run when not given).
func APIKeyID(apiKeyID string) RunOption {
	return func(r *runcapv1.CreateRunRequest) { r.ApiKeyId = apiKeyID }
}

// UserID charges the run to a user as well (inherited from the parent run
// when not given).
func UserID(userID string) RunOption {
	return func(r *runcapv1.CreateRunRequest) { r.UserId = userID }
}

// TeamID charges the run to a team as well (inherited from the parent run
// when not given).
func TeamID(teamID string) RunOption {
	return func(r *runcapv1.CreateRunRequest) { r.TeamId = teamID }
}

// Policy governs the run beyond its dollar limit: its enforcement mode,
// threshold bands and throttling, token, call-meter, rate and in-flight
// limits, and caps on its subagents. Fields left unset take the server's
// defaults (the response's Run.Policy has them all filled in); a subagent
// run given no policy takes its parent's, and a root run its scopes' default
// policy (SetScopePolicy: the API key's, else the user's, else the team's).
// The policy is copied.
//
//	client.CreateRun(ctx, "run-1", 5_000_000, runcap.Policy(&runcapv1.RunPolicy{
//		EnforcementMode: runcapv1.EnforcementMode_ENFORCEMENT_MODE_ADVISORY,
//		MeterLimits:     map[string]int64{"tool:serp_api": 50},
//		RateLimit:       &runcapv1.RateLimit{MaxCalls: 30, Window: durationpb.New(time.Minute)},
//		MaxInFlight:     proto.Int32(4),
//	}))
//
// Creating a child past its parent's MaxChildren or an ancestor's MaxDepth
// fails with an error matching runcaperr.ErrSubagentLimit.
//
// AutoDowngrade makes an LLM call that does not fit the budget hold the best
// alternative that does (the priciest that fits, with every capability the
// LLMCall needs) and answer DECISION_DOWNGRADE instead of blocking;
// DowngradeModels limits alternatives and downgrades to the models it names
// ("provider/model"):
//
//	runcap.Policy(&runcapv1.RunPolicy{AutoDowngrade: true, DowngradeModels: []string{"openai/gpt-4o-mini"}})
//
// ApprovalPercent (1 to 100; 0 never) and ApprovedMeters are escalation
// triggers: a call that would bring the run's committed and held spend past
// that percent of its limit, or that names a meter not on the list, is
// answered DECISION_APPROVAL_REQUIRED (an *ApprovalRequiredError from Hold and
// WithReservation) until its approval is approved with Approve:
//
//	runcap.Policy(&runcapv1.RunPolicy{ApprovalPercent: 80, ApprovedMeters: []string{"tool:search"}})
func Policy(policy *runcapv1.RunPolicy) RunOption {
	return func(r *runcapv1.CreateRunRequest) {
		if policy == nil {
			r.Policy = nil
			return
		}
		r.Policy = proto.Clone(policy).(*runcapv1.RunPolicy)
	}
}

// GetRun returns a run's configuration and current budget state.
func (c *Client) GetRun(ctx context.Context, runID string) (*runcapv1.GetRunResponse, error) {
	return call(ctx, c, true, c.stub.GetRun, &runcapv1.GetRunRequest{RunId: runID})
}

// GetDecision returns a Reserve decision by its id (the DecisionID of a
// ReserveResponse, a Hold or a BudgetBlockedError), with the inputs it was
// made from: the amount asked for and held, every scope checked, what
// objected, the LLM estimate, and where the reservation is now. Decisions
// are kept as long as their run; one the server does not have is an error
// matching runcaperr.ErrDecisionNotFound (IsDecisionNotFound).
func (c *Client) GetDecision(ctx context.Context, decisionID string) (*runcapv1.GetDecisionResponse, error) {
	return call(ctx, c, true, c.stub.GetDecision, &runcapv1.GetDecisionRequest{DecisionId: decisionID})
}

// Approve approves a pending escalation (the ApprovalId of a ReserveResponse,
// the ApprovalID of an *ApprovalRequiredError, a Watch event's ApprovalId or
// Run.Approvals): calls that trip its trigger are decided as usual from now
// on, on every replica, and Watch shows it. It returns the approval and the
// run's budget state; approving an approved one changes nothing (Replayed is
// set), so the call is retried. An approval the run never requested is an
// error matching runcaperr.ErrApprovalNotFound, and one that was denied
// runcaperr.ErrApprovalResolved.
func (c *Client) Approve(ctx context.Context, approvalID string) (*runcapv1.ApproveResponse, error) {
	return call(ctx, c, true, c.stub.Approve, &runcapv1.ApproveRequest{ApprovalId: approvalID})
}

// Deny denies a pending escalation: calls that trip its trigger are blocked
// from now on (DECISION_REASON_APPROVAL_DENIED; the *BudgetBlockedError's
// ApprovalID names it), and Watch shows it. Denying a denied one changes
// nothing (Replayed is set), so the call is retried. An approval the run
// never requested is an error matching runcaperr.ErrApprovalNotFound, and
// one that was approved runcaperr.ErrApprovalResolved.
func (c *Client) Deny(ctx context.Context, approvalID string) (*runcapv1.DenyResponse, error) {
	return call(ctx, c, true, c.stub.Deny, &runcapv1.DenyRequest{ApprovalId: approvalID})
}

// ReserveOption sets an optional field of Reserve, Hold and WithReservation
// (and of their LLM call forms ReserveLLM, HoldLLM and WithLLMReservation).
type ReserveOption func(*runcapv1.ReserveRequest)

// ReservationID sets the reservation id (the idempotency key). Without it a
// random id is generated on the client, so retries stay idempotent.
func ReservationID(id string) ReserveOption {
	return func(r *runcapv1.ReserveRequest) { r.ReservationId = id }
}

// TTL sets how long the hold lives (whole milliseconds); the run's default
// ttl applies otherwise.
func TTL(d time.Duration) ReserveOption {
	return func(r *runcapv1.ReserveRequest) { r.Ttl = durationpb.New(d) }
}

// Meter counts the call on the named call meter (for example
// "tool:serp_api"), one unit unless MeterUnits says otherwise. The run's
// policy may cap a meter (RunPolicy.MeterLimits); a call past the cap is
// blocked with BlockingDimension BUDGET_DIMENSION_METER.
func Meter(name string) ReserveOption {
	return func(r *runcapv1.ReserveRequest) { r.Meter = name }
}

// MeterUnits sets how many units of the Meter the call uses (1 when not
// given). Only with Meter: the server rejects units without a meter.
func MeterUnits(units int64) ReserveOption {
	return func(r *runcapv1.ReserveRequest) { r.MeterUnits = proto.Int64(units) }
}

func reserveRequest(runID string, amountMicros int64, opts []ReserveOption) *runcapv1.ReserveRequest {
	return withReserveOptions(&runcapv1.ReserveRequest{
		RunId:    runID,
		Estimate: &runcapv1.ReserveRequest_AmountMicros{AmountMicros: amountMicros},
	}, opts)
}

func reserveLLMRequest(runID string, llm LLMCall, opts []ReserveOption) *runcapv1.ReserveRequest {
	return withReserveOptions(&runcapv1.ReserveRequest{
		RunId:    runID,
		Estimate: &runcapv1.ReserveRequest_LlmCall{LlmCall: llm.Proto()},
	}, opts)
}

func withReserveOptions(req *runcapv1.ReserveRequest, opts []ReserveOption) *runcapv1.ReserveRequest {
	for _, o := range opts {
		o(req)
	}
	if req.ReservationId == "" {
		req.ReservationId = NewReservationID()
	}
	return req
}

// Reserve asks to hold amountMicros against the run and returns the
// decision. A block is a response (Decision == DECISION_BLOCK), not an
// error. The reservation id (generated when not given) is in the response.
// ReserveLLM reserves for an LLM call instead.
//
// The run's policy adds two decisions: DECISION_WARN (an advisory run: the
// amount is held, but a blocking run would have refused it; Reason and
// BlockingDimension say why) and DECISION_THROTTLE (nothing is held: reserve
// again, with a new reservation id, after RetryAfter). A call that trips one
// of the run's escalation triggers (ApprovalPercent, ApprovedMeters) is
// answered DECISION_APPROVAL_REQUIRED: nothing is held, and the response's
// ApprovalId names the approval to Approve before reserving again with a new
// reservation id. The response's DecisionId names the decision for
// GetDecision.
func (c *Client) Reserve(ctx context.Context, runID string, amountMicros int64, opts ...ReserveOption) (*runcapv1.ReserveResponse, error) {
	return call(ctx, c, true, c.stub.Reserve, reserveRequest(runID, amountMicros, opts))
}

// ReserveLLM asks to hold the server's price of an LLM call against the
// run (its input tokens at the input price plus its effective maximum
// output at the output price) and returns the decision, with the pricing in
// the response's Estimate. A model the server has no price for is a block
// with DECISION_REASON_UNKNOWN_PRICE (fail closed). Commit it with
// CommitUsage (or Commit, with a cost in micros). A block by money lists the
// Alternatives that would fit; a run with AutoDowngrade answers
// DECISION_DOWNGRADE instead, holding the estimate of a cheaper model
// (Estimate.Model; RequestedModel is the one asked for) under the response's
// ReservationId: call that model, and commit with that id.
//
//	resp, err := client.ReserveLLM(ctx, runID, runcap.LLMCall{Provider: "openai", Model: "gpt-4o", InputTokens: 1200, MaxOutputTokens: 500})
func (c *Client) ReserveLLM(ctx context.Context, runID string, llm LLMCall, opts ...ReserveOption) (*runcapv1.ReserveResponse, error) {
	return call(ctx, c, true, c.stub.Reserve, reserveLLMRequest(runID, llm, opts))
}

// Commit records a reservation's actual cost and releases the rest of its
// hold. Repeating it with the same cost is a replay.
func (c *Client) Commit(ctx context.Context, runID, reservationID string, actualMicros int64) (*runcapv1.CommitResponse, error) {
	req := &runcapv1.CommitRequest{
		RunId:         runID,
		ReservationId: reservationID,
		Actual:        &runcapv1.CommitRequest_ActualMicros{ActualMicros: actualMicros},
	}
	return call(ctx, c, true, c.stub.Commit, req)
}

// CommitUsage records the actual token usage of a reservation made with
// ReserveLLM (or HoldLLM); the server prices it at the reservation's own
// rates and releases the rest of the hold. A reservation of an amount has
// no rates: the server rejects usage for it (INVALID_ARGUMENT).
func (c *Client) CommitUsage(ctx context.Context, runID, reservationID string, usage TokenUsage) (*runcapv1.CommitResponse, error) {
	req := &runcapv1.CommitRequest{
		RunId:         runID,
		ReservationId: reservationID,
		Actual:        &runcapv1.CommitRequest_Usage{Usage: usage.Proto()},
	}
	return call(ctx, c, true, c.stub.Commit, req)
}

// Refund releases a reservation's whole hold. A refund of a reservation
// that already settled changes nothing (Replayed is set).
func (c *Client) Refund(ctx context.Context, runID, reservationID string) (*runcapv1.RefundResponse, error) {
	req := &runcapv1.RefundRequest{RunId: runID, ReservationId: reservationID}
	return call(ctx, c, true, c.stub.Refund, req)
}

// CloseRun closes a run to new reservations; holds already made still settle.
func (c *Client) CloseRun(ctx context.Context, runID string) (*runcapv1.CloseRunResponse, error) {
	return call(ctx, c, true, c.stub.CloseRun, &runcapv1.CloseRunRequest{RunId: runID})
}

// SuspendRun is the kill switch: it stops a run at once. Every later Reserve
// on the run, or on any of its descendants, is blocked with
// DECISION_REASON_SUSPENDED (on every replica) until ResumeRun; holds
// already made still settle, and Watch shows an EVENT_TYPE_SUSPENDED change.
// Suspending a suspended run changes nothing (Replayed is set), so the call
// is retried. A closed run cannot be suspended: that is a
// FAILED_PRECONDITION error matching runcaperr.ErrRunClosed.
func (c *Client) SuspendRun(ctx context.Context, runID string) (*runcapv1.SuspendRunResponse, error) {
	return call(ctx, c, true, c.stub.SuspendRun, &runcapv1.SuspendRunRequest{RunId: runID})
}

// ResumeRun lets a suspended run reserve again (Watch shows an
// EVENT_TYPE_RESUMED change). Resuming a run that is not suspended changes
// nothing (Replayed is set), so the call is retried. A closed run cannot be
// resumed: that is an error matching runcaperr.ErrRunClosed.
func (c *Client) ResumeRun(ctx context.Context, runID string) (*runcapv1.ResumeRunResponse, error) {
	return call(ctx, c, true, c.stub.ResumeRun, &runcapv1.ResumeRunRequest{RunId: runID})
}

// SetScopeLimit sets the ceiling of a parent scope (an API key, a user or a
// team) for one period to limitMicros, and returns the scope after the
// change. A new ceiling applies from the next reservation on; holds made
// before it stay. Setting a value is idempotent, so the call is retried.
//
//	client.SetScopeLimit(ctx, runcapv1.ScopeKind_SCOPE_KIND_TEAM, "team-7", runcapv1.Period_PERIOD_DAILY, 50_000_000)
func (c *Client) SetScopeLimit(ctx context.Context, kind runcapv1.ScopeKind, scopeID string, period runcapv1.Period, limitMicros int64) (*runcapv1.SetScopeLimitResponse, error) {
	req := &runcapv1.SetScopeLimitRequest{
		Scope:   &runcapv1.ScopeRef{Kind: kind, Id: scopeID},
		Period:  period,
		Ceiling: &runcapv1.SetScopeLimitRequest_LimitMicros{LimitMicros: limitMicros},
	}
	return call(ctx, c, true, c.stub.SetScopeLimit, req)
}

// ClearScopeLimit removes the ceiling of a parent scope for one period (its
// spend is still tracked) and returns the scope after the change.
func (c *Client) ClearScopeLimit(ctx context.Context, kind runcapv1.ScopeKind, scopeID string, period runcapv1.Period) (*runcapv1.SetScopeLimitResponse, error) {
	req := &runcapv1.SetScopeLimitRequest{
		Scope:   &runcapv1.ScopeRef{Kind: kind, Id: scopeID},
		Period:  period,
		Ceiling: &runcapv1.SetScopeLimitRequest_Clear{Clear: true},
	}
	return call(ctx, c, true, c.stub.SetScopeLimit, req)
}

// SetScopePolicy sets the default run policy of a parent scope (an API key,
// a user or a team) and returns the scope after the change (its
// DefaultPolicy). A root run created without a Policy gets its API key's
// default policy, else its user's, else its team's (else the server's
// defaults); a subagent run still takes its parent's. It applies to runs
// created afterwards: a run's policy never changes. The policy is copied;
// a nil policy is an error, returned before any call (ClearScopePolicy
// removes the default). Setting a value is idempotent, so the call is
// retried.
//
//	client.SetScopePolicy(ctx, runcapv1.ScopeKind_SCOPE_KIND_TEAM, "team-7", &runcapv1.RunPolicy{
//		EnforcementMode: runcapv1.EnforcementMode_ENFORCEMENT_MODE_ADVISORY,
//	})
func (c *Client) SetScopePolicy(ctx context.Context, kind runcapv1.ScopeKind, scopeID string, policy *runcapv1.RunPolicy) (*runcapv1.SetScopePolicyResponse, error) {
	if policy == nil {
		return nil, errNilScopePolicy
	}
	req := &runcapv1.SetScopePolicyRequest{
		Scope:   &runcapv1.ScopeRef{Kind: kind, Id: scopeID},
		Default: &runcapv1.SetScopePolicyRequest_Policy{Policy: proto.Clone(policy).(*runcapv1.RunPolicy)},
	}
	return call(ctx, c, true, c.stub.SetScopePolicy, req)
}

var errNilScopePolicy = errors.New("runcap: SetScopePolicy needs a policy (ClearScopePolicy removes one)")

// ClearScopePolicy removes the default run policy of a parent scope (root
// runs created afterwards fall back to the next scope's, or the server's
// defaults) and returns the scope after the change.
func (c *Client) ClearScopePolicy(ctx context.Context, kind runcapv1.ScopeKind, scopeID string) (*runcapv1.SetScopePolicyResponse, error) {
	req := &runcapv1.SetScopePolicyRequest{
		Scope:   &runcapv1.ScopeRef{Kind: kind, Id: scopeID},
		Default: &runcapv1.SetScopePolicyRequest_Clear{Clear: true},
	}
	return call(ctx, c, true, c.stub.SetScopePolicy, req)
}

// GetScope returns a parent scope's ceilings, its usage in the current
// window of each period (lifetime, daily, monthly, in that order) and its
// DefaultPolicy (nil when it has none). A scope nobody has charged or
// limited reads as zeros with no limits.
func (c *Client) GetScope(ctx context.Context, kind runcapv1.ScopeKind, scopeID string) (*runcapv1.GetScopeResponse, error) {
	req := &runcapv1.GetScopeRequest{Scope: &runcapv1.ScopeRef{Kind: kind, Id: scopeID}}
	return call(ctx, c, true, c.stub.GetScope, req)
}

// NewReservationID returns a fresh random reservation id (32 hex digits).
func NewReservationID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return hex.EncodeToString(b[:])
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
