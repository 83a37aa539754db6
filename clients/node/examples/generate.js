#!/usr/bin/env node
'use strict';
// Stream a completion from a running kuiper-serve to stdout.
//
//   node examples/generate.js "Once upon a time" --max-new-tokens 64 --temperature 0
//   node examples/generate.js --chat "Write a haiku about the sea"
//
// Addresses: --address HOST:PORT (inference, default localhost:50051) and
// --tokenizer-address HOST:PORT (default localhost:50052), or $KUIPER_ADDRESS.

const { parseArgs } = require('node:util');
const { KuiperClient } = require('../src');

const USAGE = `usage: generate.js [--address HOST:PORT] [--max-new-tokens N] [--temperature T]
                   [--top-p P] [--top-k K] [--seed S] [--stop STR]... [--chat] [--json] PROMPT`;

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      address: { type: 'string', default: process.env.KUIPER_ADDRESS || 'localhost:50051' },
      'tokenizer-address': { type: 'string', default: 'localhost:50052' },
      'max-new-tokens': { type: 'string', default: '128' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      'top-k': { type: 'string' },
      seed: { type: 'string' },
      stop: { type: 'string', multiple: true, default: [] },
      chat: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help || positionals.length === 0) {
    console.error(USAGE);
    return values.help ? 0 : 2;
  }
  const prompt = positionals.join(' ');
  /** @type {import('../src/client').SamplingParams} */
  const sampling = { maxNewTokens: Number(values['max-new-tokens']), stop: values.stop };
  if (values.temperature !== undefined) sampling.temperature = Number(values.temperature);
  if (values['top-p'] !== undefined) sampling.topP = Number(values['top-p']);
  if (values['top-k'] !== undefined) sampling.topK = Number(values['top-k']);
  if (values.seed !== undefined) sampling.seed = values.seed;

  const client = new KuiperClient({
    inferenceAddress: values.address,
    tokenizerAddress: values['tokenizer-address'],
    deadlineMs: 0, // a long story may take a while on a CPU; Ctrl-C cancels
  });
  const stream = values.chat
    ? client.chat([{ role: 'user', content: prompt }], sampling)
    : client.generate(prompt, sampling);
  const ids = [];
  let text = '';
  try {
    for await (const chunk of stream) {
      ids.push(...chunk.tokenIds);
      text += chunk.text;
      if (!values.json) process.stdout.write(chunk.text);
      if (chunk.finishReason) {
        const u = chunk.usage;
        if (values.json) {
          const out = { token_ids: ids, text, finish_reason: chunk.finishReason, usage: u };
          console.log(JSON.stringify(out));
        } else {
          console.error(
            `\n[${chunk.finishReason}: ${u?.promptTokens} prompt + ${u?.completionTokens} ` +
              `generated tokens, first token after ${u?.timeToFirstTokenS.toFixed(3)} s]`,
          );
        }
      }
    }
  } catch (err) {
    console.error(`\nerror: ${/** @type {Error} */ (err).message}`);
    return 1;
  } finally {
    client.close();
  }
  return 0;
}

main().then((code) => {
  process.exitCode = code;
});
