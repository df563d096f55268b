// Package mlxhost drives an mlx-bridge worker (mlx-bridge, or any
// program that speaks docs/protocol.md, such as mlx-bridge-mock) over
// its stdin and stdout, one JSON object per line.
//
// Every request gets an integer id, so several may be in flight at once and
// each reply line is routed to its own request by id. Stderr is drained all
// the time (a full pipe would block the worker) and its last bytes are kept
// for the error that reports a crash.
package mlxhost

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"iter"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Config says how to start a worker. Only Command is required.
type Config struct {
	Command      []string      // e.g. {"mlx-bridge"}, or {"python3", "-P", "-m", "bridge"}
	Dir          string        // working directory ("" = ours)
	Env          []string      // environment (nil = ours)
	Stderr       io.Writer     // also copy the worker's stderr here (nil = keep only the tail)
	StderrTail   int           // bytes of stderr kept for ExitError (default 8 KiB)
	MaxLineBytes int           // longest reply line (default 64 MiB, as hello's limits.max_line_bytes)
	HelloTimeout time.Duration // start-up, until hello is answered (default 30 s)
	CancelGrace  time.Duration // after a cancel, how long to wait for the terminal line (default 5 s)
	QuitTimeout  time.Duration // Close: wait this long after quit before SIGTERM (default 2 s)
	TermTimeout  time.Duration // Close: wait this long after SIGTERM before SIGKILL (default 2 s)
}

// Request is one request line: "cmd" and its fields. The worker sets "id".
type Request map[string]any

// Reply is one reply line. Fields a type does not have are zero; Decode
// reads the others (hello's limits, loaded's model facts, ...).
type Reply struct {
	Type            string          `json:"type"`
	ID              *uint64         `json:"id"`
	Token           string          `json:"token"`
	TokenID         int             `json:"token_id"`
	FinishReason    string          `json:"finish_reason"`
	TokensGenerated int             `json:"tokens_generated"`
	Error           string          `json:"error"`
	Code            string          `json:"code"`
	Raw             json.RawMessage `json:"-"`
}

// Decode unmarshals the whole reply line into v.
func (r Reply) Decode(v any) error { return json.Unmarshal(r.Raw, v) }

// Terminal reports whether r ends its request: every type but "token".
func (r Reply) Terminal() bool { return r.Type != "token" }

// Worker is a running worker process. Its methods are safe for concurrent use.
type Worker struct {
	Hello Reply // the worker's answer to hello

	cfg     Config
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	tail    *tailBuffer
	writeMu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]*mailbox // requests that have not had their terminal line
	gone    error               // set when the worker has exited: ErrClosed or *ExitError
	closing bool

	exited    chan struct{} // closed once the process is reaped
	exitErr   error         // *ExitError if it did not exit with status 0
	closeOnce sync.Once
}

// Start spawns cfg.Command and waits for its answer to hello.
func Start(ctx context.Context, cfg Config) (*Worker, error) {
	cfg = withDefaults(cfg)
	cmd := exec.Command(cfg.Command[0], cfg.Command[1:]...)
	cmd.Dir, cmd.Env = cfg.Dir, cfg.Env
	// Its own process group: a Ctrl-C at the terminal reaches only us, and we
	// cancel and quit in order. (If we die, the worker sees end of stdin and exits.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("mlxhost: starting %q: %w", cfg.Command, err)
	}
	w := &Worker{
		cfg: cfg, cmd: cmd, stdin: stdin, tail: &tailBuffer{max: cfg.StderrTail},
		pending: map[uint64]*mailbox{}, exited: make(chan struct{}),
	}
	stderrDone := make(chan struct{})
	go func() {
		defer close(stderrDone)
		var sink io.Writer = w.tail
		if cfg.Stderr != nil {
			sink = io.MultiWriter(w.tail, cfg.Stderr)
		}
		_, _ = io.Copy(sink, stderr)
	}()
	go w.readLoop(stdout, stderrDone)

	helloCtx, cancel := context.WithTimeout(ctx, cfg.HelloTimeout)
	defer cancel()
	if w.Hello, err = w.Call(helloCtx, Request{"cmd": "hello"}); err != nil {
		_ = w.Close()
		return nil, fmt.Errorf("mlxhost: waiting for hello: %w", err)
	}
	return w, nil
}

func withDefaults(c Config) Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.HelloTimeout, 30*time.Second)
	def(&c.CancelGrace, 5*time.Second)
	def(&c.QuitTimeout, 2*time.Second)
	def(&c.TermTimeout, 2*time.Second)
	if c.StderrTail == 0 {
		c.StderrTail = 8 << 10
	}
	if c.MaxLineBytes == 0 {
		c.MaxLineBytes = 64 << 20
	}
	return c
}

// Stream sends req and yields its replies as they arrive: for generate and
// chat, "token" replies and then the terminal "done"; for other commands,
// just the terminal reply. An "error" reply is yielded as a *RequestError.
//
// When ctx ends first, the request is cancelled in the worker and the stream
// goes on until its terminal line (for a generation, a "done" with
// FinishReason "cancelled"), for at most Config.CancelGrace. Breaking out of
// the loop early cancels the request too, without waiting.
func (w *Worker) Stream(ctx context.Context, req Request) iter.Seq2[Reply, error] {
	return func(yield func(Reply, error) bool) {
		id, box, err := w.submit(req)
		if err != nil {
			yield(Reply{}, err)
			return
		}
		done := ctx.Done()
		var grace <-chan time.Time
		for {
			it, ok := box.pop()
			if !ok {
				select {
				case <-box.ready:
				case <-done: // cancel once, then wait for the terminal line
					done = nil
					w.cancel(id)
					grace = time.After(w.cfg.CancelGrace)
				case <-grace:
					w.abandon(id)
					yield(Reply{}, fmt.Errorf("mlxhost: request %d: no terminal line %v after cancel: %w",
						id, w.cfg.CancelGrace, context.Cause(ctx)))
					return
				}
				continue
			}
			terminal := it.err != nil || it.reply.Terminal()
			if !yield(it.reply, it.err) {
				if !terminal {
					w.abandon(id)
					w.cancel(id)
				}
				return
			}
			if terminal {
				return
			}
		}
	}
}

// Call sends a request that has a single reply (hello, ping, load, info,
// tokenize, ...) and returns that reply. A generation's tokens are skipped.
func (w *Worker) Call(ctx context.Context, req Request) (Reply, error) {
	for r, err := range w.Stream(ctx, req) {
		if err != nil || r.Terminal() {
			return r, err
		}
	}
	panic("unreachable: a stream always ends with a terminal reply or an error")
}

// Close stops the worker: quit (and end of stdin), then SIGTERM after
// QuitTimeout, then SIGKILL after TermTimeout. Streams still open end with
// their terminal lines (quit cancels them) or with ErrClosed. It returns an
// *ExitError if the worker did not exit with status 0 (it crashed, or needed
// a signal), and nil otherwise.
func (w *Worker) Close() error {
	w.closeOnce.Do(func() {
		w.mu.Lock()
		w.closing = true
		w.mu.Unlock()
		_ = w.send(Request{"cmd": "quit"}) // fails harmlessly if the worker is gone
		_ = w.stdin.Close()
		if w.waitExit(w.cfg.QuitTimeout) {
			return
		}
		_ = w.cmd.Process.Signal(syscall.SIGTERM)
		if w.waitExit(w.cfg.TermTimeout) {
			return
		}
		_ = w.cmd.Process.Kill()
		<-w.exited
	})
	<-w.exited
	return w.exitErr
}

func (w *Worker) waitExit(d time.Duration) bool {
	select {
	case <-w.exited:
		return true
	case <-time.After(d):
		return false
	}
}

func (w *Worker) submit(req Request) (uint64, *mailbox, error) {
	w.mu.Lock()
	if w.gone != nil || w.closing {
		err := w.gone
		w.mu.Unlock()
		if err == nil {
			err = ErrClosed
		}
		return 0, nil, err
	}
	w.nextID++
	id := w.nextID
	box := newMailbox()
	w.pending[id] = box
	w.mu.Unlock()

	line := make(Request, len(req)+1)
	for k, v := range req {
		line[k] = v
	}
	line["id"] = id
	if err := w.send(line); err != nil {
		w.mu.Lock()
		delete(w.pending, id)
		w.mu.Unlock()
		return 0, nil, fmt.Errorf("mlxhost: writing request: %w", err)
	}
	return id, box, nil
}

func (w *Worker) send(req Request) error {
	line, err := json.Marshal(req)
	if err != nil {
		return err
	}
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	_, err = w.stdin.Write(append(line, '\n'))
	return err
}

func (w *Worker) cancel(id uint64) { _ = w.send(Request{"cmd": "cancel", "id": id}) }

// abandon drops the rest of a request's lines until its terminal line.
func (w *Worker) abandon(id uint64) {
	w.mu.Lock()
	if box := w.pending[id]; box != nil {
		box.abandoned = true
	}
	w.mu.Unlock()
}

func (w *Worker) readLoop(stdout io.Reader, stderrDone <-chan struct{}) {
	sc := bufio.NewScanner(stdout) // strips "\n" and a trailing "\r"
	sc.Buffer(make([]byte, 0, 64<<10), w.cfg.MaxLineBytes+2)
	for sc.Scan() {
		w.route(sc.Bytes())
	}
	if err := sc.Err(); err != nil { // a line over the limit: the framing is lost
		w.faultAll(err.Error(), nil)
		_ = w.cmd.Process.Kill()
		_, _ = io.Copy(io.Discard, stdout)
	}
	<-stderrDone // Wait closes the pipes: read both to the end first
	_ = w.cmd.Wait()

	st := w.cmd.ProcessState
	exit := &ExitError{ExitCode: st.ExitCode(), StderrTail: w.tail.String()}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		exit.Signal = ws.Signal().String()
	}
	if !st.Success() {
		w.exitErr = exit
	}
	w.mu.Lock()
	w.gone = exit
	if w.closing {
		w.gone = ErrClosed
	}
	boxes := w.pending
	w.pending = nil
	w.mu.Unlock()
	for _, box := range boxes {
		if !box.abandoned {
			box.put(item{err: w.gone})
		}
	}
	close(w.exited)
}

func (w *Worker) route(line []byte) {
	if len(bytes.TrimSpace(line)) == 0 {
		return
	}
	var r Reply
	if err := json.Unmarshal(line, &r); err != nil || r.Type == "" {
		w.faultAll("the worker wrote a line that is not a reply", line)
		return
	}
	r.Raw = bytes.Clone(line)
	w.mu.Lock()
	var box *mailbox
	if r.ID != nil {
		box = w.pending[*r.ID]
	}
	if box != nil && r.Terminal() {
		delete(w.pending, *r.ID)
	}
	abandoned := box != nil && box.abandoned
	w.mu.Unlock()
	switch {
	case box == nil:
		w.faultAll("the worker wrote a line for no request in flight", line)
	case abandoned: // the host gave up on it: drop its lines quietly
	case r.Type == "error":
		box.put(item{err: &RequestError{ID: *r.ID, Code: r.Code, Message: r.Error}})
	default:
		box.put(item{reply: r})
	}
}

// faultAll fails every request in flight with a *ProtocolError and cancels
// them in the worker: a line that cannot be routed means we can no longer
// trust which line belongs to which request.
func (w *Worker) faultAll(reason string, line []byte) {
	if len(line) > 200 {
		line = line[:200]
	}
	err := &ProtocolError{Reason: reason, Line: string(line)}
	var ids []uint64
	w.mu.Lock()
	for id, box := range w.pending {
		if !box.abandoned {
			box.abandoned = true
			box.put(item{err: err})
			ids = append(ids, id)
		}
	}
	w.mu.Unlock()
	for _, id := range ids {
		w.cancel(id)
	}
}

// mailbox is one request's queue of replies: unbounded, so that a slow
// reader of one stream never stalls the routing of the others.
type mailbox struct {
	mu        sync.Mutex
	items     []item
	ready     chan struct{}
	abandoned bool // guarded by Worker.mu
}

type item struct {
	reply Reply
	err   error
}

func newMailbox() *mailbox { return &mailbox{ready: make(chan struct{}, 1)} }

func (m *mailbox) put(it item) {
	m.mu.Lock()
	m.items = append(m.items, it)
	m.mu.Unlock()
	select {
	case m.ready <- struct{}{}:
	default:
	}
}

func (m *mailbox) pop() (item, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.items) == 0 {
		return item{}, false
	}
	it := m.items[0]
	m.items = m.items[1:]
	return it, true
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.ToValidUTF8(string(t.buf), "")
}
