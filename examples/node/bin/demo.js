#!/usr/bin/env node
// Drives a worker end to end: hello, load, a streamed chat (Ctrl-C or
// --timeout cancels it), two requests at once, shutdown.
//
//   node bin/demo.js [--model PATH] [--prompt TEXT] [--max-tokens N] [--timeout SECS] [-- WORKER COMMAND...]
//
// The worker command defaults to `mlx-bridge` (the worker's console script on
// PATH; `python -m bridge` would import a `bridge.py` in the working directory).

import { parseArgs } from 'node:util';

import { Worker } from '../lib/worker.js';

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    model: { type: 'string' },
    prompt: { type: 'string', default: 'Write a haiku about rivers.' },
    'max-tokens': { type: 'string', default: '64' },
    timeout: { type: 'string', default: '30' },
  },
});
const [command, ...args] = positionals.length ? positionals : ['mlx-bridge'];

const worker = await Worker.start(command, args, { echoStderr: true });
try {
  console.log(`worker ${worker.hello.pid} is ready`);
  if (opts.model) {
    const loaded = await worker.call({ cmd: 'load', path: opts.model });
    console.log(`loaded ${opts.model} (${loaded.model_type}) in ${loaded.load_ms} ms`);
  }

  // A streamed chat; Ctrl-C or the timeout cancels it, and the loop still
  // ends on its terminal line, a `done` with finish_reason "cancelled".
  const controller = new AbortController();
  const onSigint = () => controller.abort(new Error('interrupted'));
  process.once('SIGINT', onSigint);
  const timer = setTimeout(() => controller.abort(new Error('timed out')), Number(opts.timeout) * 1000);
  const chat = { cmd: 'chat', messages: [{ role: 'user', content: opts.prompt }], max_tokens: Number(opts['max-tokens']) };
  try {
    for await (const reply of worker.stream(chat, { signal: controller.signal })) {
      if (reply.type === 'token') process.stdout.write(reply.token);
      else console.log(`\n[${reply.finish_reason}, ${reply.tokens_generated} tokens]`);
    }
  } finally {
    clearTimeout(timer);
    process.off('SIGINT', onSigint);
  }

  // Two requests in flight at once; each line is routed by its id.
  const prompts = ['Once upon a time', 'The capital of France is'];
  const texts = await Promise.all(
    prompts.map(async (prompt) => {
      let text = '';
      for await (const reply of worker.stream({ cmd: 'generate', prompt, max_tokens: 16 })) text += reply.token ?? '';
      return text;
    }),
  );
  prompts.forEach((prompt, i) => console.log(`${JSON.stringify(prompt)} -> ${JSON.stringify(texts[i])}`));
} catch (error) {
  console.error(`mlx-host-demo: ${error.message}`);
  process.exitCode = 1;
} finally {
  await worker.close(); // quit, then SIGTERM, then SIGKILL
}
