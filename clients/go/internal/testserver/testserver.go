// Package testserver starts the real runcap server (the Python package
// runcap_server) as a subprocess for the Go client's tests.
//
// The Python interpreter is $RUNCAP_PYTHON, or the repository's
// .venv/bin/python (../../.venv/bin/python relative to clients/go).
package testserver

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"time"
)

var listening = regexp.MustCompile(`runcap listening on (\S+)`)

// Server is a running runcap server process.
type Server struct {
	// Addr is the address the server listens on, host:port.
	Addr string

	cmd    *exec.Cmd
	exited chan struct{}
	mu     sync.Mutex
	log    bytes.Buffer
}

// Python returns the interpreter that runs the server.
func Python() (string, error) {
	if p := os.Getenv("RUNCAP_PYTHON"); p != "" {
		return p, nil
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, "..", "..", ".venv", "bin", "python"), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testserver: no go.mod above the working directory; set RUNCAP_PYTHON")
		}
		dir = parent
	}
}

// Start runs `python -m runcap_server serve` with args (for example
// "--listen", "127.0.0.1:0", "--backend", "memory") and env (KEY=VALUE
// additions), and waits for its "runcap listening on" line.
func Start(args []string, env ...string) (*Server, error) {
	python, err := Python()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(python, append([]string{"-m", "runcap_server", "serve"}, args...)...)
	cmd.Env = append(append(os.Environ(),
		"RUNCAP_SHUTDOWN_GRACE=3s",
		"PYTHONUNBUFFERED=1",
		// Test servers on loopback run without API keys.
		"RUNCAP_INSECURE_DEV=1",
	), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = nil
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("testserver: starting %s: %w", python, err)
	}
	s := &Server{cmd: cmd, exited: make(chan struct{})}
	addr := make(chan string, 1)
	go func() {
		scanner := bufio.NewScanner(stderr)
		found := false
		for scanner.Scan() {
			line := scanner.Text()
			s.mu.Lock()
			s.log.WriteString(line + "\n")
			s.mu.Unlock()
			if m := listening.FindStringSubmatch(line); m != nil && !found {
				found = true
				addr <- m[1]
			}
		}
		_ = cmd.Wait()
		close(s.exited)
	}()
	select {
	case s.Addr = <-addr:
		return s, nil
	case <-s.exited:
		return nil, fmt.Errorf("testserver: server exited before listening:\n%s", s.Log())
	case <-time.After(30 * time.Second):
		s.Kill()
		return nil, fmt.Errorf("testserver: server did not listen within 30s:\n%s", s.Log())
	}
}

// Log returns what the server wrote to stderr so far.
func (s *Server) Log() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

// Stop sends SIGTERM (the graceful path: Watch streams get a final progress
// message) and waits for the process to exit, killing it after 15 s.
func (s *Server) Stop() error {
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		return nil
	case <-time.After(15 * time.Second):
		s.Kill()
		return errors.New("testserver: server did not stop within 15s of SIGTERM; killed")
	}
}

// Kill kills the process and waits for it to exit.
func (s *Server) Kill() {
	_ = s.cmd.Process.Kill()
	<-s.exited
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
