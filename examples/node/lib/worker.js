// A small host for mlx-bridge workers (`mlx-bridge`, or anything that
// speaks docs/protocol.md, such as `mlx-bridge-mock`). No dependencies.
//
//   const worker = await Worker.start('mlx-bridge', []);
//   await worker.call({ cmd: 'load', path: '/models/qwen3' });
//   for await (const reply of worker.stream({ cmd: 'chat', messages, max_tokens: 64 }, { signal })) {
//     if (reply.type === 'token') process.stdout.write(reply.token);
//   }
//   await worker.close();
//
// Every request gets an integer id, so many may be in flight at once; each
// stdout line is routed by its id to the queue of its request. Stderr is
// drained all the time (a full pipe would block the worker) and its tail is
// kept for the error that reports a crash.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

export class WorkerError extends Error {
  get name() {
    return this.constructor.name;
  }
}

/** The worker answered with an `error` line. Branch on `code`, not the message. */
export class RequestError extends WorkerError {
  constructor(id, code, message) {
    super(`request ${id} failed: ${message} (${code})`);
    Object.assign(this, { id, code });
  }
}

/** A line that is not a reply to a request in flight: every request in flight fails. */
export class ProtocolError extends WorkerError {
  constructor(reason, line) {
    super(`protocol error: ${reason}: ${JSON.stringify(line)}`);
    this.line = line;
  }
}

/** The worker exited while the request was in flight; `stderrTail` usually says why. */
export class WorkerExitedError extends WorkerError {
  constructor(exitCode, signal, stderrTail) {
    super(`worker exited (${signal ? `signal ${signal}` : `exit code ${exitCode}`}); stderr tail:\n${stderrTail}`);
    Object.assign(this, { exitCode, signal, stderrTail });
  }
}

/** The worker was closed by `close()`, or never started. */
export class WorkerClosedError extends WorkerError {
  constructor(message = 'worker closed') {
    super(message);
  }
}

/** No terminal line in time after a cancel. */
export class CancelTimeoutError extends WorkerError {}

const DEFAULTS = {
  cwd: undefined,
  env: undefined,
  helloTimeoutMs: 30_000, // start-up, until hello is answered
  cancelGraceMs: 5_000, // after a cancel, how long to wait for the terminal line
  quitTimeoutMs: 2_000, // close(): after quit, wait this long before SIGTERM...
  termTimeoutMs: 2_000, // ...and after SIGTERM, this long before SIGKILL
  stderrTailBytes: 8192,
  echoStderr: false, // also copy the worker's stderr to ours
};

// One request's replies: unbounded, so a slow reader of one stream never
// stalls the routing of the others.
class Mailbox {
  items = [];
  waiter = null;
  abandoned = false; // the host gave up on it: drop its lines until the terminal one

  put(item) {
    const waiter = this.waiter;
    this.waiter = null;
    if (waiter) waiter(item);
    else this.items.push(item);
  }

  next() {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve) => (this.waiter = resolve));
  }
}

export class Worker {
  /** The worker's answer to hello (`protocol_version`, `limits`, `pid`...). */
  hello = null;

  #options;
  #child;
  #nextId = 0;
  #pending = new Map(); // id -> Mailbox
  #gone = null; // the error for requests made after the worker has gone
  #closing = false;
  #exit = null; // { exitCode, signal } once it has exited
  #exited;
  #tail = Buffer.alloc(0);

  /** Spawns `command args...` and waits for its answer to hello. */
  static async start(command, args = [], options = {}) {
    const worker = new Worker(command, args, options);
    try {
      worker.hello = await worker.call({ cmd: 'hello' }, { signal: AbortSignal.timeout(worker.#options.helloTimeoutMs) });
    } catch (error) {
      await worker.close();
      throw error;
    }
    return worker;
  }

  constructor(command, args, options) {
    this.#options = { ...DEFAULTS, ...options };
    const { cwd, env, stderrTailBytes, echoStderr } = this.#options;
    // detached: its own process group, so a Ctrl-C at the terminal reaches only
    // us and we cancel and quit in order. (If we die, the worker sees end of stdin.)
    const child = spawn(command, args, { cwd, env, stdio: 'pipe', detached: true });
    this.#child = child;
    child.stdin.on('error', () => {}); // EPIPE once the worker is gone: 'close' reports it
    createInterface({ input: child.stdout, crlfDelay: Infinity }).on('line', (line) => this.#route(line));
    child.stderr.on('data', (chunk) => {
      this.#tail = Buffer.concat([this.#tail, chunk]).subarray(-stderrTailBytes);
      if (echoStderr) process.stderr.write(chunk);
    });
    this.#exited = new Promise((resolve) => {
      child.on('error', (error) => this.#finish(new WorkerClosedError(`cannot start ${command}: ${error.message}`)));
      child.on('close', (exitCode, signal) => {
        this.#exit = { exitCode, signal };
        this.#finish(this.#closing ? new WorkerClosedError() : new WorkerExitedError(exitCode, signal, this.stderrTail));
        resolve();
      });
    });
  }

  get pid() {
    return this.#child.pid;
  }

  get stderrTail() {
    return this.#tail.toString('utf8');
  }

  /**
   * Sends `request` and returns an async iterator of its replies: for generate
   * and chat, `token` replies then the terminal `done`; for the others, just
   * the terminal reply. An `error` reply is thrown as a RequestError.
   *
   * When `signal` aborts, the request is cancelled in the worker and the
   * iteration goes on until its terminal line (for a generation, a `done` with
   * finish_reason "cancelled"), for at most cancelGraceMs. Breaking out of
   * the loop early cancels the request too, without waiting.
   */
  stream(request, { signal } = {}) {
    const id = ++this.#nextId;
    const box = new Mailbox();
    if (this.#gone || this.#closing) {
      box.put({ error: this.#gone ?? new WorkerClosedError() });
    } else {
      this.#pending.set(id, box);
      this.#send({ ...request, id });
    }
    return this.#replies(id, box, signal);
  }

  /** Sends a request with a single reply (ping, load, info...) and returns that reply. */
  async call(request, options) {
    for await (const reply of this.stream(request, options)) {
      if (reply.type !== 'token') return reply;
    }
    throw new Error('unreachable: a stream always ends with a terminal reply or an error');
  }

  /**
   * Stops the worker: quit and end of stdin, then SIGTERM after quitTimeoutMs,
   * then SIGKILL after termTimeoutMs. Open streams end with their terminal
   * lines (quit cancels them) or a WorkerClosedError. Resolves to how it
   * exited, `{ exitCode, signal }`; never rejects, so it fits in `finally`.
   */
  async close() {
    if (!this.#closing) {
      this.#closing = true;
      this.#send({ cmd: 'quit' });
      this.#child.stdin.end();
      const { quitTimeoutMs, termTimeoutMs } = this.#options;
      if (!(await this.#waitExit(quitTimeoutMs))) {
        this.#child.kill('SIGTERM');
        if (!(await this.#waitExit(termTimeoutMs))) this.#child.kill('SIGKILL');
      }
    }
    await this.#exited;
    return this.#exit;
  }

  async *#replies(id, box, signal) {
    let graceTimer;
    const onAbort = () => {
      this.#send({ cmd: 'cancel', id });
      graceTimer = setTimeout(() => {
        box.abandoned = true;
        box.put({ error: new CancelTimeoutError(`request ${id}: no terminal line ${this.#options.cancelGraceMs} ms after cancel`) });
      }, this.#options.cancelGraceMs);
    };
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
    let finished = false;
    try {
      for (;;) {
        const { reply, error } = await box.next();
        finished = true;
        if (error) throw error;
        finished = reply.type !== 'token';
        yield reply;
        if (finished) return;
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      clearTimeout(graceTimer);
      if (!finished) {
        box.abandoned = true;
        this.#send({ cmd: 'cancel', id });
      }
    }
  }

  #send(line) {
    if (this.#child.stdin.writable) this.#child.stdin.write(`${JSON.stringify(line)}\n`);
  }

  #route(line) {
    if (!line.trim()) return;
    let reply;
    try {
      reply = JSON.parse(line);
    } catch {
      return this.#faultAll('the worker wrote a line that is not JSON', line);
    }
    if (typeof reply?.type !== 'string') return this.#faultAll('the worker wrote a line that is not a reply', line);
    const box = this.#pending.get(reply.id);
    if (!box) return this.#faultAll('the worker wrote a line for no request in flight', line);
    if (reply.type !== 'token') this.#pending.delete(reply.id);
    if (box.abandoned) return;
    box.put(reply.type === 'error' ? { error: new RequestError(reply.id, reply.code, reply.error) } : { reply });
  }

  // A line that cannot be routed means we can no longer trust the routing:
  // fail every request in flight and cancel it in the worker, but keep the worker.
  #faultAll(reason, line) {
    const error = new ProtocolError(reason, line.slice(0, 200));
    for (const [id, box] of this.#pending) {
      if (box.abandoned) continue;
      box.abandoned = true;
      box.put({ error });
      this.#send({ cmd: 'cancel', id });
    }
  }

  #finish(error) {
    this.#gone ??= error;
    for (const box of this.#pending.values()) if (!box.abandoned) box.put({ error });
    this.#pending.clear();
  }

  #waitExit(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), ms);
      this.#exited.then(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }
}
