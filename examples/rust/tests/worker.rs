//! Drives `python -m mock_worker` (and `-m bridge` end to end) from the
//! repository root. MLX_BRIDGE_PYTHON picks the interpreter; the default is
//! the repository's .venv, then python3.

use mlx_host::{Error, Event, Options, Worker};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MLX_BRIDGE_PYTHON") {
        return p.into();
    }
    let venv = repo_root().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

fn command(module: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg("-m").arg(module).args(args).current_dir(repo_root());
    cmd.env("PYTHONPATH", repo_root()).env("HF_HUB_OFFLINE", "1");
    cmd
}

fn mock(args: &[&str]) -> Worker {
    let worker = Worker::spawn(command("mock_worker", args)).expect("spawn mock_worker");
    worker.call(json!({"cmd": "load", "path": "mock/model"})).expect("load");
    worker
}

/// Reads a stream to its end: the token texts and how it ended.
fn collect(stream: mlx_host::Stream) -> (String, Result<Value, Error>) {
    let mut text = String::new();
    for event in stream {
        match event {
            Ok(Event::Token(t)) => text.push_str(&t.token),
            Ok(Event::Done(done)) => return (text, Ok(done.raw)),
            Ok(Event::Reply(reply)) => return (text, Ok(reply)),
            Err(e) => return (text, Err(e)),
        }
    }
    unreachable!()
}

fn generate(prompt: &str, max_tokens: u64, mock: Value) -> Value {
    json!({"cmd": "generate", "prompt": prompt, "max_tokens": max_tokens, "mock": mock})
}

#[test]
fn hello_and_stream() {
    let worker = mock(&[]);
    assert_eq!(worker.hello()["protocol_version"], 1);
    assert_eq!(worker.hello()["limits"]["max_line_bytes"], 64 << 20);
    let chat =
        json!({"cmd": "chat", "messages": [{"role": "user", "content": "hello big world"}], "max_tokens": 4});
    let (text, done) = collect(worker.stream(chat).unwrap());
    assert_eq!(text, "hello big world hello");
    let done = done.unwrap();
    assert_eq!(
        (done["finish_reason"].as_str(), done["tokens_generated"].as_u64()),
        (Some("length"), Some(4))
    );
}

#[test]
fn request_error() {
    let worker = Worker::spawn(command("mock_worker", &[])).unwrap();
    match worker.call(json!({"cmd": "generate", "prompt": "x"})) {
        Err(Error::Request { code, .. }) => assert_eq!(code, "no_model"),
        other => panic!("want no_model, got {:?}", other),
    }
    worker.call(json!({"cmd": "ping"})).expect("the worker keeps serving");
}

#[test]
fn cancel_from_another_thread() {
    let worker = mock(&[]);
    let mut stream = worker.stream(generate("a b c", 100_000, json!({"token_delay": 0.005}))).unwrap();
    let canceller = stream.canceller();
    for _ in 0..3 {
        assert!(matches!(stream.next(), Some(Ok(Event::Token(_)))));
    }
    thread::spawn(move || canceller.cancel());
    let (_, done) = collect(stream);
    let done = done.unwrap();
    assert_eq!(done["finish_reason"], "cancelled");
    assert!(done["tokens_generated"].as_u64().unwrap() >= 3);
}

#[test]
fn cancel_on_timeout() {
    let worker = mock(&[]);
    let stream = worker.stream(generate("a b c", 100_000, json!({"token_delay": 0.005}))).unwrap();
    let (_, done) = collect(stream.timeout(Duration::from_millis(100)));
    assert_eq!(done.unwrap()["finish_reason"], "cancelled");
}

#[test]
fn dropping_a_stream_cancels_it() {
    let worker = mock(&[]);
    let mut stream = worker.stream(generate("a b c", 100_000, json!({"token_delay": 0.005}))).unwrap();
    stream.next();
    drop(stream); // cancels; its late lines are dropped quietly
    worker.call(json!({"cmd": "ping"})).unwrap();
}

#[test]
fn concurrent_requests_are_routed_by_id() {
    let worker = mock(&[]);
    let words = ["apple", "banana"];
    let texts: Vec<String> = thread::scope(|scope| {
        let handles: Vec<_> = words
            .iter()
            .map(|w| {
                let stream = worker.stream(generate(w, 20, json!({"token_delay": 0.002}))).unwrap();
                scope.spawn(move || collect(stream).0)
            })
            .collect();
        worker.call(json!({"cmd": "ping"})).unwrap(); // answered at once, between the tokens
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (word, text) in words.iter().zip(texts) {
        assert_eq!(text, vec![*word; 20].join(" "));
    }
}

#[test]
fn crash_carries_exit_code_and_stderr_tail() {
    let worker = mock(&["--crash-after", "2", "--exit-code", "3"]);
    let (text, end) = collect(worker.stream(generate("a b", 100, Value::Null)).unwrap());
    assert_eq!(text, "a b");
    match end {
        Err(Error::Exited { code: Some(3), stderr_tail, .. }) => {
            assert!(stderr_tail.contains("crash_after=2"), "{}", stderr_tail)
        }
        other => panic!("want Exited with code 3, got {:?}", other),
    }
    assert!(matches!(worker.call(json!({"cmd": "ping"})), Err(Error::Exited { .. })));
}

#[test]
fn worker_dying_at_start_up() {
    let mut cmd = Command::new(python());
    cmd.args(["-c", "import sys; sys.stderr.write('no luck\\n'); sys.exit(4)"]);
    match Worker::spawn(cmd) {
        Err(Error::Exited { code: Some(4), stderr_tail, .. }) => assert_eq!(stderr_tail, "no luck\n"),
        Err(other) => panic!("want Exited with code 4, got {:?}", other),
        Ok(_) => panic!("want Exited with code 4, got a worker"),
    }
}

#[test]
fn garbage_line_is_a_protocol_error() {
    let worker = mock(&[]);
    let (text, end) = collect(worker.stream(generate("a b", 50, json!({"garbage_after": 1}))).unwrap());
    assert_eq!(text, "a");
    match end {
        Err(Error::Protocol { line, .. }) => assert_eq!(line, "this is not json"),
        other => panic!("want a protocol error, got {:?}", other),
    }
    // The worker is kept; the failed request's late lines are dropped.
    let (text, end) = collect(worker.stream(generate("ok", 2, Value::Null)).unwrap());
    assert_eq!((text.as_str(), end.is_ok()), ("ok ok", true));
}

#[test]
fn shutdown_ladder() {
    let fast = Options {
        quit_timeout: Duration::from_millis(300),
        term_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let cases: [(&[&str], Option<i32>); 3] = [
        (&[], None),
        (&["--ignore-quit"], Some(libc::SIGTERM)),
        (&["--ignore-quit", "--ignore-sigterm"], Some(libc::SIGKILL)),
    ];
    for (args, signal) in cases {
        // A worker that ignores quit: don't wait long on each rung.
        let opts = if args.is_empty() { Options::default() } else { fast.clone() };
        let mut worker = Worker::spawn_with(command("mock_worker", args), opts).unwrap();
        match (worker.close(), signal) {
            (Ok(()), None) => {}
            (Err(Error::Exited { signal: got, .. }), Some(_)) => {
                assert_eq!(got, signal, "{:?}", args)
            }
            (other, _) => panic!("{:?}: want signal {:?}, got {:?}", args, signal, other),
        }
        assert!(matches!(worker.call(json!({"cmd": "ping"})), Err(Error::Closed)));
    }
}

/// One end-to-end run against the real worker with the tiny demo model.
#[test]
fn real_worker() {
    let probe = Command::new(python())
        .args(["-c", "import importlib.util, mlx.core; assert importlib.util.find_spec('mlx_lm')"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("\n!!! SKIPPED (LOUD): {:?} cannot import mlx.core or find mlx_lm: the end-to-end test against python -m bridge did not run !!!\n", python());
        return;
    }
    let model = match std::env::var_os("MLX_BRIDGE_DEMO_MODEL") {
        Some(dir) => PathBuf::from(dir), // a directory to build the model in, or reuse it from
        None => std::env::temp_dir().join(format!("mlx-host-rust-{}", std::process::id())),
    };
    let built = command("bridge.demo_model", &[model.to_str().unwrap()]).output().unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));

    let mut worker = Worker::spawn(command("bridge", &[])).unwrap();
    let loaded = worker.call(json!({"cmd": "load", "path": model})).unwrap();
    assert_eq!(loaded["model_type"], "qwen3");
    let chat = json!({"cmd": "chat", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8});
    let (text, done) = collect(worker.stream(chat).unwrap());
    let done = done.unwrap();
    assert!(!text.is_empty());
    assert_eq!(
        (done["finish_reason"].as_str(), done["tokens_generated"].as_u64()),
        (Some("length"), Some(8))
    );
    let long = worker.stream(json!({"cmd": "generate", "prompt": "Hello", "max_tokens": 100_000})).unwrap();
    let (_, done) = collect(long.timeout(Duration::from_millis(200)));
    assert_eq!(done.unwrap()["finish_reason"], "cancelled");
    worker.close().unwrap();
    if std::env::var_os("MLX_BRIDGE_DEMO_MODEL").is_none() {
        let _ = std::fs::remove_dir_all(model);
    }
}
