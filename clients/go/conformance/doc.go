// Package conformance holds the Go driver of the shared client conformance
// scenario, tests/conformance/scenario.json at the repository root, which
// the Python and TypeScript drivers run too. The driver is a test
// (scenario_test.go); this package has no other code.
//
// `go test ./conformance` starts a live server (memory backend) with
// internal/testserver; set RUNCAP_CONFORMANCE_TARGET=host:port to run the
// scenario against a server that is already running instead, and
// RUNCAP_CONFORMANCE_SCENARIO=path to run another scenario file.
package conformance
