package mlxhost_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"example.com/mlxhost"
)

// The tests drive `python -m mock_worker` (and `-m bridge` end to end) from
// the repository root. MLX_BRIDGE_PYTHON picks the interpreter; the default
// is the repository's .venv, then python3.
var repoRoot, _ = filepath.Abs("../..")

func python() string {
	if p := os.Getenv("MLX_BRIDGE_PYTHON"); p != "" {
		return p
	}
	if p := filepath.Join(repoRoot, ".venv", "bin", "python"); fileExists(p) {
		return p
	}
	return "python3"
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func config(module string, args ...string) mlxhost.Config {
	return mlxhost.Config{
		Command: append([]string{python(), "-m", module}, args...),
		Dir:     repoRoot,
		Env:     append(os.Environ(), "PYTHONPATH="+repoRoot, "HF_HUB_OFFLINE=1"),
	}
}

func start(t *testing.T, cfg mlxhost.Config) *mlxhost.Worker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, err := mlxhost.Start(ctx, cfg)
	if err != nil {
		t.Fatalf("start %v: %v", cfg.Command, err)
	}
	t.Cleanup(func() { _ = w.Close() })
	return w
}

func startMock(t *testing.T, args ...string) *mlxhost.Worker {
	t.Helper()
	w := start(t, config("mock_worker", args...))
	call(t, w, mlxhost.Request{"cmd": "load", "path": "mock/model"})
	return w
}

func call(t *testing.T, w *mlxhost.Worker, req mlxhost.Request) mlxhost.Reply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := w.Call(ctx, req)
	if err != nil {
		t.Fatalf("%v: %v", req, err)
	}
	return r
}

// collect reads a stream to its end: the token texts, the terminal reply, the error.
func collect(ctx context.Context, w *mlxhost.Worker, req mlxhost.Request) (texts []string, last mlxhost.Reply, err error) {
	for r, err := range w.Stream(ctx, req) {
		if err != nil {
			return texts, last, err
		}
		if !r.Terminal() {
			texts = append(texts, r.Token)
		}
		last = r
	}
	return texts, last, nil
}

func TestHelloAndStream(t *testing.T) {
	t.Parallel()
	w := startMock(t)
	var hello struct {
		ProtocolVersion int            `json:"protocol_version"`
		Limits          map[string]int `json:"limits"`
	}
	if err := w.Hello.Decode(&hello); err != nil || hello.ProtocolVersion != 1 || hello.Limits["max_line_bytes"] != 64<<20 {
		t.Fatalf("hello: %+v %v", hello, err)
	}
	texts, done, err := collect(context.Background(), w, mlxhost.Request{
		"cmd": "chat", "messages": []map[string]string{{"role": "user", "content": "hello big world"}}, "max_tokens": 4,
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(texts, ""); got != "hello big world hello" {
		t.Errorf("text %q", got)
	}
	if done.Type != "done" || done.FinishReason != "length" || done.TokensGenerated != 4 {
		t.Errorf("done %s", done.Raw)
	}
}

func TestRequestError(t *testing.T) {
	t.Parallel()
	w := start(t, config("mock_worker"))
	_, err := w.Call(context.Background(), mlxhost.Request{"cmd": "generate", "prompt": "x"})
	var re *mlxhost.RequestError
	if !errors.As(err, &re) || re.Code != "no_model" {
		t.Fatalf("want no_model, got %v", err)
	}
	call(t, w, mlxhost.Request{"cmd": "ping"}) // the worker keeps serving
}

func TestCancel(t *testing.T) {
	t.Parallel()
	w := startMock(t)
	long := mlxhost.Request{"cmd": "generate", "prompt": "a b c", "max_tokens": 100000, "mock": map[string]any{"token_delay": 0.005}}

	t.Run("context cancelled after 3 tokens", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		n := 0
		var last mlxhost.Reply
		for r, err := range w.Stream(ctx, long) {
			if err != nil {
				t.Fatal(err)
			}
			if n++; n == 3 {
				cancel()
			}
			last = r
		}
		if last.FinishReason != "cancelled" || last.TokensGenerated < 3 {
			t.Fatalf("want a cancelled done after >= 3 tokens, got %s", last.Raw)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, last, err := collect(ctx, w, long)
		if err != nil || last.FinishReason != "cancelled" {
			t.Fatalf("want a cancelled done, got %s, %v", last.Raw, err)
		}
	})
	t.Run("break out of the loop", func(t *testing.T) {
		for range w.Stream(context.Background(), long) {
			break // cancels the request; its late lines are dropped quietly
		}
		call(t, w, mlxhost.Request{"cmd": "ping"})
	})
}

func TestConcurrentRequests(t *testing.T) {
	t.Parallel()
	w := startMock(t)
	prompts := []string{"apple", "banana"}
	results := make([][]string, len(prompts))
	var wg sync.WaitGroup
	for i, p := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			texts, _, err := collect(context.Background(), w, mlxhost.Request{
				"cmd": "generate", "prompt": p, "max_tokens": 20, "mock": map[string]any{"token_delay": 0.002},
			})
			if err != nil {
				t.Error(err)
			}
			results[i] = texts
		}()
	}
	call(t, w, mlxhost.Request{"cmd": "ping"}) // answered at once, between the tokens
	wg.Wait()
	for i, p := range prompts {
		want := strings.TrimSpace(strings.Repeat(" "+p, 20))
		if got := strings.Join(results[i], ""); got != want {
			t.Errorf("request %d: got %q, want %q", i, got, want)
		}
	}
}

func TestCrashCarriesExitCodeAndStderrTail(t *testing.T) {
	t.Parallel()
	w := startMock(t, "--crash-after", "2", "--exit-code", "3")
	texts, _, err := collect(context.Background(), w, mlxhost.Request{"cmd": "generate", "prompt": "a b", "max_tokens": 100})
	var exit *mlxhost.ExitError
	if !errors.As(err, &exit) {
		t.Fatalf("want *ExitError, got %v", err)
	}
	if len(texts) != 2 || exit.ExitCode != 3 || !strings.Contains(exit.StderrTail, "crash_after=2") {
		t.Fatalf("tokens %q, exit code %d, stderr tail %q", texts, exit.ExitCode, exit.StderrTail)
	}
	if _, err := w.Call(context.Background(), mlxhost.Request{"cmd": "ping"}); !errors.As(err, &exit) {
		t.Fatalf("a request after the crash: want *ExitError, got %v", err)
	}
}

func TestWorkerDyingAtStartUp(t *testing.T) {
	t.Parallel()
	cfg := mlxhost.Config{Command: []string{python(), "-c", `import sys; sys.stderr.write("no luck\n"); sys.exit(4)`}}
	_, err := mlxhost.Start(context.Background(), cfg)
	var exit *mlxhost.ExitError
	if !errors.As(err, &exit) || exit.ExitCode != 4 || exit.StderrTail != "no luck\n" {
		t.Fatalf("want an *ExitError with code 4 and the stderr tail, got %v", err)
	}
}

func TestGarbageLineIsAProtocolError(t *testing.T) {
	t.Parallel()
	w := startMock(t)
	texts, _, err := collect(context.Background(), w, mlxhost.Request{
		"cmd": "generate", "prompt": "a b", "max_tokens": 50, "mock": map[string]any{"garbage_after": 1},
	})
	var pe *mlxhost.ProtocolError
	if !errors.As(err, &pe) || pe.Line != "this is not json" || len(texts) != 1 {
		t.Fatalf("want a ProtocolError after 1 token, got %q, %v", texts, err)
	}
	// The worker is kept; the failed request's late lines are dropped.
	texts, _, err = collect(context.Background(), w, mlxhost.Request{"cmd": "generate", "prompt": "ok", "max_tokens": 2})
	if err != nil || strings.Join(texts, "") != "ok ok" {
		t.Fatalf("after the fault: %q, %v", texts, err)
	}
}

func TestShutdownLadder(t *testing.T) {
	t.Parallel()
	fast := func(args ...string) mlxhost.Config {
		c := config("mock_worker", args...)
		if len(args) > 0 { // a worker that ignores quit: don't wait long on each rung
			c.QuitTimeout, c.TermTimeout = 300*time.Millisecond, 300*time.Millisecond
		}
		return c
	}
	cases := []struct {
		args   []string
		signal string
	}{
		{nil, ""},
		{[]string{"--ignore-quit"}, "terminated"},
		{[]string{"--ignore-quit", "--ignore-sigterm"}, "killed"},
	}
	for _, c := range cases {
		t.Run(strings.Join(append([]string{"mock_worker"}, c.args...), " "), func(t *testing.T) {
			w := start(t, fast(c.args...))
			err := w.Close()
			var exit *mlxhost.ExitError
			if c.signal == "" && err != nil || c.signal != "" && (!errors.As(err, &exit) || exit.Signal != c.signal) {
				t.Fatalf("want signal %q, got %v", c.signal, err)
			}
			if _, err := w.Call(context.Background(), mlxhost.Request{"cmd": "ping"}); !errors.Is(err, mlxhost.ErrClosed) {
				t.Fatalf("a request after Close: want ErrClosed, got %v", err)
			}
		})
	}
}

// One end-to-end run against the real worker with the tiny demo model.
func TestRealWorker(t *testing.T) {
	t.Parallel()
	if err := exec.Command(python(), "-c", "import importlib.util, mlx.core; assert importlib.util.find_spec('mlx_lm')").Run(); err != nil {
		t.Skipf("SKIPPED (LOUD): %s cannot import mlx.core or find mlx_lm (%v): the end-to-end test against python -m bridge did not run", python(), err)
	}
	model := os.Getenv("MLX_BRIDGE_DEMO_MODEL") // a directory to build the model in, or reuse it from
	if model == "" {
		model = filepath.Join(t.TempDir(), "tiny")
	}
	build := exec.Command(python(), "-m", "bridge.demo_model", model)
	build.Dir, build.Env = repoRoot, config("bridge").Env
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the demo model: %v\n%s", err, out)
	}
	w := start(t, config("bridge"))
	var loaded struct {
		ModelType string `json:"model_type"`
	}
	if err := call(t, w, mlxhost.Request{"cmd": "load", "path": model}).Decode(&loaded); err != nil || loaded.ModelType != "qwen3" {
		t.Fatalf("loaded %+v %v", loaded, err)
	}
	texts, done, err := collect(context.Background(), w, mlxhost.Request{
		"cmd": "chat", "messages": []map[string]string{{"role": "user", "content": "Say hi"}}, "max_tokens": 8,
	})
	if err != nil || len(texts) == 0 || done.FinishReason != "length" || done.TokensGenerated != 8 {
		t.Fatalf("chat: %q %s %v", texts, done.Raw, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, done, err = collect(ctx, w, mlxhost.Request{"cmd": "generate", "prompt": "Hello", "max_tokens": 100000})
	if err != nil || done.FinishReason != "cancelled" {
		t.Fatalf("cancel: %s %v", done.Raw, err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}
