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
                   [--top-p P] [--top-k K] [--seed S] [--stop STR]... [--chat] [--json] PROMPT
(a negative value needs '=': --temperature=-1)`;

const ARGS = {
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
};

/** Numeric flags and their SamplingParams key. */
const NUMERIC = [
  ['max-new-tokens', 'maxNewTokens'],
  ['temperature', 'temperature'],
  ['top-p', 'topP'],
  ['top-k', 'topK'],
  ['seed', 'seed'],
];

/** @param {string} message */
function usageError(message) {
  console.error(`error: ${message}\n${USAGE}`);
  return 2;
}

/**
 * The object `kuiper generate --json` prints, field for field: snake_case, finish_reason in
 * lower case ("length"), usage null when the server sent none.
 * @param {number[]} ids @param {string} text @param {string} finishReason
 * @param {import('../src').Usage | null} usage
 */
function jsonResult(ids, text, finishReason, usage) {
  return {
    token_ids: ids,
    text,
    finish_reason: finishReason.toLowerCase(),
    usage: usage && {
      prompt_tokens: usage.promptTokens,
      completion_tokens: usage.completionTokens,
      time_to_first_token_s: usage.timeToFirstTokenS,
      queue_time_s: usage.queueTimeS,
      cached_prompt_tokens: usage.cachedPromptTokens,
    },
  };
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs(/** @type {any} */ (ARGS));
  } catch (err) {
    return usageError(/** @type {Error} */ (err).message.split('\n')[0]); // one line, no stack
  }
  const values = /** @type {Record<string, any>} */ (parsed.values);
  const positionals = parsed.positionals;
  if (values.help || positionals.length === 0) {
    console.error(USAGE);
    return values.help ? 0 : 2;
  }
  const prompt = positionals.join(' ');
  /** @type {Record<string, any>} */
  const sampling = { stop: values.stop };
  for (const [flag, key] of NUMERIC) {
    const text = values[flag];
    if (text === undefined) continue;
    if (text.trim() === '' || Number.isNaN(Number(text))) {
      return usageError(`--${flag} takes a number, got '${text}'`);
    }
    sampling[key] = key === 'seed' ? text.trim() : Number(text); // seed: uint64, every digit
  }

  const client = new KuiperClient({
    inferenceAddress: values.address,
    tokenizerAddress: values['tokenizer-address'],
    deadlineMs: 0, // a long story may take a while on a CPU; Ctrl-C cancels
  });
  const ids = [];
  let text = '';
  try {
    const stream = values.chat
      ? client.chat([{ role: 'user', content: prompt }], sampling)
      : client.generate(prompt, sampling);
    for await (const chunk of stream) {
      ids.push(...chunk.tokenIds);
      text += chunk.text;
      if (!values.json) process.stdout.write(chunk.text);
      if (chunk.finishReason) {
        const u = chunk.usage;
        if (values.json) {
          console.log(JSON.stringify(jsonResult(ids, text, chunk.finishReason, u)));
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
