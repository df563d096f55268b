// Command mlxhost-demo drives a worker end to end: hello, load, a streamed
// chat (Ctrl-C or -timeout cancels it), two requests at once, shutdown.
//
//	mlxhost-demo [-model PATH] [-prompt TEXT] [-max-tokens N] [-timeout 30s] [--] [WORKER COMMAND...]
//
// The worker command defaults to `mlx-bridge` (the worker's console script on
// PATH; `python -m bridge` would import a `bridge.py` in the working directory).
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"example.com/mlxhost"
)

func main() {
	model := flag.String("model", "", "model to load (a directory, or a repo id in the local Hugging Face cache)")
	prompt := flag.String("prompt", "Write a haiku about rivers.", "the chat message")
	maxTokens := flag.Int("max-tokens", 64, "most tokens to generate")
	timeout := flag.Duration("timeout", 30*time.Second, "cancel the chat after this long")
	flag.Parse()
	command := flag.Args()
	if len(command) == 0 {
		command = []string{"mlx-bridge"}
	}
	log.SetFlags(0)
	if err := run(command, *model, *prompt, *maxTokens, *timeout); err != nil {
		log.Fatal(err)
	}
}

func run(command []string, model, prompt string, maxTokens int, timeout time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	w, err := mlxhost.Start(ctx, mlxhost.Config{Command: command, Stderr: os.Stderr})
	if err != nil {
		return err
	}
	defer w.Close()
	var hello struct {
		PID   int     `json:"pid"`
		Model *string `json:"model"`
	}
	_ = w.Hello.Decode(&hello)
	fmt.Printf("worker %d is ready\n", hello.PID)

	if model != "" {
		loaded, err := w.Call(ctx, mlxhost.Request{"cmd": "load", "path": model})
		if err != nil {
			return err
		}
		var facts struct {
			ModelType string  `json:"model_type"`
			LoadMS    float64 `json:"load_ms"`
		}
		_ = loaded.Decode(&facts)
		fmt.Printf("loaded %s (%s) in %.0f ms\n", model, facts.ModelType, facts.LoadMS)
	}

	// A streamed chat; Ctrl-C or the timeout cancels it, and the loop still
	// ends on its terminal line, a "done" with finish_reason "cancelled".
	chatCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	chat := mlxhost.Request{
		"cmd":        "chat",
		"messages":   []map[string]string{{"role": "user", "content": prompt}},
		"max_tokens": maxTokens,
	}
	for r, err := range w.Stream(chatCtx, chat) {
		if err != nil {
			return err
		}
		if r.Terminal() {
			fmt.Printf("\n[%s, %d tokens]\n", r.FinishReason, r.TokensGenerated)
		} else {
			fmt.Print(r.Token)
		}
	}
	stop() // a second Ctrl-C now kills us the default way

	// Two requests in flight at once; each line is routed by its id.
	prompts := []string{"Once upon a time", "The capital of France is"}
	texts := make([]string, len(prompts))
	errs := make([]error, len(prompts))
	var wg sync.WaitGroup
	for i, p := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b strings.Builder
			for r, err := range w.Stream(context.Background(), mlxhost.Request{"cmd": "generate", "prompt": p, "max_tokens": 16}) {
				if err != nil {
					errs[i] = err
					return
				}
				b.WriteString(r.Token)
			}
			texts[i] = b.String()
		}()
	}
	wg.Wait()
	for i, p := range prompts {
		if errs[i] != nil {
			return errs[i]
		}
		fmt.Printf("%q -> %q\n", p, texts[i])
	}
	return w.Close() // quit, then SIGTERM, then SIGKILL
}
