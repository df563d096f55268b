//! Drives a worker end to end: hello, load, a streamed chat (Ctrl-C or
//! --timeout cancels it), two requests at once, shutdown.
//!
//!     mlx-host-demo [--model PATH] [--prompt TEXT] [--max-tokens N] [--timeout SECS] [-- WORKER COMMAND...]
//!
//! The worker command defaults to `mlx-bridge` (the worker's console script on
//! PATH; `python -m bridge` would import a `bridge.py` in the working directory).

use mlx_host::{Error, Event, Options, Worker};
use serde_json::json;
use std::io::Write;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Args {
    model: Option<String>,
    prompt: String,
    max_tokens: u64,
    timeout: Duration,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        model: None,
        prompt: "Write a haiku about rivers.".into(),
        max_tokens: 64,
        timeout: Duration::from_secs(30),
        command: vec!["mlx-bridge".into()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{} needs a value", arg));
        match arg.as_str() {
            "--model" => args.model = Some(value()?),
            "--prompt" => args.prompt = value()?,
            "--max-tokens" => {
                args.max_tokens = value()?.parse().map_err(|e| format!("--max-tokens: {}", e))?
            }
            "--timeout" => {
                let secs: f64 = value()?.parse().map_err(|e| format!("--timeout: {}", e))?;
                args.timeout = Duration::from_secs_f64(secs);
            }
            "--" => {
                args.command = it.collect();
                break;
            }
            other => return Err(format!("unknown argument {:?}", other)),
        }
    }
    if args.command.is_empty() {
        return Err("the worker command is empty".into());
    }
    Ok(args)
}

fn run(args: Args) -> Result<(), Error> {
    let mut command = Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    let mut worker = Worker::spawn_with(command, Options { echo_stderr: true, ..Options::default() })?;
    println!("worker {} is ready", worker.hello()["pid"]);

    if let Some(model) = &args.model {
        let loaded = worker.call(json!({"cmd": "load", "path": model}))?;
        println!(
            "loaded {} ({}) in {} ms",
            model,
            loaded["model_type"].as_str().unwrap_or("?"),
            loaded["load_ms"]
        );
    }

    // A streamed chat; Ctrl-C or the timeout cancels it, and the stream still
    // ends on its terminal line, a Done with finish_reason "cancelled".
    let chat = json!({
        "cmd": "chat",
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
    });
    let stream = worker.stream(chat)?.timeout(args.timeout);
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let (stop, stopped) = mpsc::channel::<()>();
    let canceller = stream.canceller();
    let watcher = thread::spawn(move || {
        while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(Duration::from_millis(50)) {
            if INTERRUPTED.swap(false, Ordering::SeqCst) {
                canceller.cancel();
            }
        }
    });
    for event in stream {
        match event? {
            Event::Token(t) => {
                print!("{}", t.token);
                let _ = std::io::stdout().flush();
            }
            Event::Done(done) => println!("\n[{}, {} tokens]", done.finish_reason, done.tokens_generated),
            Event::Reply(reply) => println!("\n{}", reply),
        }
    }
    drop(stop);
    let _ = watcher.join();
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };

    // Two requests in flight at once; each line is routed by its id.
    let prompts = ["Once upon a time", "The capital of France is"];
    let streams = prompts
        .iter()
        .map(|p| worker.stream(json!({"cmd": "generate", "prompt": p, "max_tokens": 16})))
        .collect::<Result<Vec<_>, _>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            thread::spawn(move || {
                stream.try_fold(String::new(), |text, event| match event? {
                    Event::Token(t) => Ok::<_, Error>(text + &t.token),
                    _ => Ok(text),
                })
            })
        })
        .collect();
    for (prompt, handle) in prompts.iter().zip(handles) {
        println!("{:?} -> {:?}", prompt, handle.join().expect("no panic")?);
    }
    worker.close() // quit, then SIGTERM, then SIGKILL
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("mlx-host-demo: {}", e);
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mlx-host-demo: {}", e);
            ExitCode::FAILURE
        }
    }
}
