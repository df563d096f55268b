// Drives `python -m mock_worker` (and `-m bridge` end to end) from the
// repository root. MLX_BRIDGE_PYTHON picks the interpreter; the default is
// the repository's .venv, then python3.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { ProtocolError, RequestError, Worker, WorkerClosedError, WorkerExitedError } from '../lib/worker.js';

const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));
const venvPython = join(repoRoot, '.venv', 'bin', 'python');
const python = process.env.MLX_BRIDGE_PYTHON || (existsSync(venvPython) ? venvPython : 'python3');
const env = { ...process.env, PYTHONPATH: repoRoot, HF_HUB_OFFLINE: '1' };
const TIMEOUT = { timeout: 30_000 };

async function start(t, module, args = [], options = {}) {
  const worker = await Worker.start(python, ['-m', module, ...args], { cwd: repoRoot, env, ...options });
  t.after(() => worker.close());
  return worker;
}

async function startMock(t, args = []) {
  const worker = await start(t, 'mock_worker', args);
  await worker.call({ cmd: 'load', path: 'mock/model' });
  return worker;
}

// Reads a stream to its end: the token texts and the terminal reply (or the error).
async function collect(stream) {
  const texts = [];
  try {
    for await (const reply of stream) {
      if (reply.type === 'token') texts.push(reply.token);
      else return { text: texts.join(''), texts, last: reply };
    }
  } catch (error) {
    return { text: texts.join(''), texts, error };
  }
}

const generate = (prompt, max_tokens, mock) => ({ cmd: 'generate', prompt, max_tokens, mock });
const slow = { token_delay: 0.005 };

test('hello and a streamed chat', TIMEOUT, async (t) => {
  const worker = await startMock(t);
  assert.equal(worker.hello.protocol_version, 1);
  assert.equal(worker.hello.limits.max_line_bytes, 64 * 1024 * 1024);
  const chat = { cmd: 'chat', messages: [{ role: 'user', content: 'hello big world' }], max_tokens: 4 };
  const { text, last, error } = await collect(worker.stream(chat));
  assert.equal(error, undefined);
  assert.equal(text, 'hello big world hello');
  assert.deepEqual([last.type, last.finish_reason, last.tokens_generated], ['done', 'length', 4]);
});

test('an error reply is a RequestError', TIMEOUT, async (t) => {
  const worker = await start(t, 'mock_worker');
  await assert.rejects(worker.call({ cmd: 'generate', prompt: 'x' }), (e) => e instanceof RequestError && e.code === 'no_model');
  await worker.call({ cmd: 'ping' }); // the worker keeps serving
});

test('cancel', TIMEOUT, async (t) => {
  const worker = await startMock(t);

  await t.test('AbortController, after 3 tokens', async () => {
    const controller = new AbortController();
    let n = 0;
    let last;
    for await (const reply of worker.stream(generate('a b c', 100_000, slow), { signal: controller.signal })) {
      if (++n === 3) controller.abort();
      last = reply;
    }
    assert.equal(last.finish_reason, 'cancelled');
    assert.ok(last.tokens_generated >= 3);
  });

  await t.test('AbortSignal.timeout', async () => {
    const { last, error } = await collect(worker.stream(generate('a b c', 100_000, slow), { signal: AbortSignal.timeout(100) }));
    assert.equal(error, undefined);
    assert.equal(last.finish_reason, 'cancelled');
  });

  await t.test('breaking out of the loop', async () => {
    for await (const _ of worker.stream(generate('a b c', 100_000, slow))) break; // cancels; late lines are dropped
    await worker.call({ cmd: 'ping' });
  });
});

test('two requests at once are routed by id', TIMEOUT, async (t) => {
  const worker = await startMock(t);
  const words = ['apple', 'banana'];
  const streams = words.map((word) => collect(worker.stream(generate(word, 20, { token_delay: 0.002 }))));
  await worker.call({ cmd: 'ping' }); // answered at once, between the tokens
  const results = await Promise.all(streams);
  words.forEach((word, i) => assert.equal(results[i].text, Array(20).fill(word).join(' ')));
});

test('a crash carries the exit code and the stderr tail', TIMEOUT, async (t) => {
  const worker = await startMock(t, ['--crash-after', '2', '--exit-code', '3']);
  const { text, error } = await collect(worker.stream(generate('a b', 100)));
  assert.equal(text, 'a b');
  assert.ok(error instanceof WorkerExitedError, String(error));
  assert.equal(error.exitCode, 3);
  assert.match(error.stderrTail, /crash_after=2/);
  await assert.rejects(worker.call({ cmd: 'ping' }), WorkerExitedError);
});

test('a worker that dies at start-up', TIMEOUT, async () => {
  const dying = ['-c', 'import sys; sys.stderr.write("no luck\\n"); sys.exit(4)'];
  await assert.rejects(Worker.start(python, dying), (e) => e instanceof WorkerExitedError && e.exitCode === 4 && e.stderrTail === 'no luck\n');
});

test('a garbage line is a ProtocolError', TIMEOUT, async (t) => {
  const worker = await startMock(t);
  const { text, error } = await collect(worker.stream(generate('a b', 50, { garbage_after: 1 })));
  assert.equal(text, 'a');
  assert.ok(error instanceof ProtocolError, String(error));
  assert.equal(error.line, 'this is not json');
  // The worker is kept; the failed request's late lines are dropped.
  const after = await collect(worker.stream(generate('ok', 2)));
  assert.deepEqual([after.text, after.error], ['ok ok', undefined]);
});

test('the shutdown ladder: quit, SIGTERM, SIGKILL', TIMEOUT, async (t) => {
  const fast = { quitTimeoutMs: 300, termTimeoutMs: 300 }; // for a worker that ignores quit
  const cases = [
    [[], { exitCode: 0, signal: null }],
    [['--ignore-quit'], { exitCode: null, signal: 'SIGTERM' }],
    [['--ignore-quit', '--ignore-sigterm'], { exitCode: null, signal: 'SIGKILL' }],
  ];
  for (const [args, exit] of cases) {
    const worker = await start(t, 'mock_worker', args, args.length ? fast : {});
    assert.deepEqual(await worker.close(), exit, args.join(' '));
    await assert.rejects(worker.call({ cmd: 'ping' }), WorkerClosedError);
  }
});

test('end to end with python -m bridge and the tiny model', { timeout: 120_000 }, async (t) => {
  if (spawnSync(python, ['-c', 'import importlib.util, mlx.core; assert importlib.util.find_spec("mlx_lm")']).status !== 0) {
    const why = `${python} cannot import mlx.core or find mlx_lm: the end-to-end test against python -m bridge did not run`;
    console.error(`\n!!! SKIPPED (LOUD): ${why} !!!\n`);
    return t.skip(why);
  }
  const scratch = process.env.MLX_BRIDGE_DEMO_MODEL ? null : mkdtempSync(join(tmpdir(), 'mlx-host-node-'));
  t.after(() => scratch && rmSync(scratch, { recursive: true, force: true }));
  const model = process.env.MLX_BRIDGE_DEMO_MODEL || join(scratch, 'tiny'); // built there, or reused
  const built = spawnSync(python, ['-m', 'bridge.demo_model', model], { cwd: repoRoot, env, encoding: 'utf8' });
  assert.equal(built.status, 0, built.stderr);

  const worker = await start(t, 'bridge');
  const loaded = await worker.call({ cmd: 'load', path: model });
  assert.equal(loaded.model_type, 'qwen3');
  const chat = { cmd: 'chat', messages: [{ role: 'user', content: 'Say hi' }], max_tokens: 8 };
  const { texts, last } = await collect(worker.stream(chat));
  assert.ok(texts.length > 0);
  assert.deepEqual([last.finish_reason, last.tokens_generated], ['length', 8]);
  const long = await collect(worker.stream(generate('Hello', 100_000), { signal: AbortSignal.timeout(200) }));
  assert.equal(long.last.finish_reason, 'cancelled');
  assert.deepEqual(await worker.close(), { exitCode: 0, signal: null });
});
