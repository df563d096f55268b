package mlxhost

import (
	"errors"
	"fmt"
)

// ErrClosed is returned for requests made after Close, and ends the streams
// that were still open when Close stopped the worker.
var ErrClosed = errors.New("mlxhost: worker closed")

// RequestError is the worker's error reply to one request. Branch on Code
// (a stable string such as "no_model"), not on Message.
type RequestError struct {
	ID      uint64
	Code    string
	Message string
}

func (e *RequestError) Error() string {
	return fmt.Sprintf("mlxhost: request %d failed: %s (%s)", e.ID, e.Message, e.Code)
}

// ProtocolError means the worker wrote something that is not a reply to a
// request in flight: a line that is not JSON, an unknown id, a line over
// Config.MaxLineBytes. Every request in flight fails with it and is cancelled
// in the worker; the worker itself is kept (if the framing was lost, it is
// killed and later requests see an *ExitError).
type ProtocolError struct {
	Reason string
	Line   string // the offending line, cut to 200 bytes
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("mlxhost: protocol error: %s: %q", e.Reason, e.Line)
}

// ExitError reports a worker that exited while requests were in flight (a
// crash), or that Close had to signal. StderrTail is the last bytes it wrote
// to stderr, which usually say why.
type ExitError struct {
	ExitCode   int    // -1 when it was killed by a signal
	Signal     string // the signal, or ""
	StderrTail string
}

func (e *ExitError) Error() string {
	how := fmt.Sprintf("exit code %d", e.ExitCode)
	if e.Signal != "" {
		how = "signal " + e.Signal
	}
	return fmt.Sprintf("mlxhost: worker exited (%s); stderr tail:\n%s", how, e.StderrTail)
}
