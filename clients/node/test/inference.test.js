'use strict';
// The Node client against the real inference service (plus the tokenizer service it uses),
// on a tiny random Llama. Texts are checked against the `tokenizers` library; greedy ids
// against the Python client over the same server.

const { before, after, describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { KuiperClient, KuiperError, status } = require('../src');
const { cliCommands, makeModelDir, pythonExe, pythonJson, startServer } = require('./harness');

const ORACLE = path.join(__dirname, 'fixtures', 'oracle.py');
const commands = cliCommands();
const missing = ['serve-tokenizer', 'serve-inference'].filter((c) => !commands.has(c));
const skip = missing.length ? `not registered in the kuiper CLI yet: ${missing.join(', ')}` : false;

/** @param {AsyncIterable<import('../src/client').GenerateChunk>} stream */
async function drain(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

/** @param {any} err @param {string} codeName */
function isCode(err, codeName) {
  assert.ok(err instanceof KuiperError, `expected a KuiperError, got ${err}`);
  assert.equal(err.codeName, codeName, err.message);
  assert.equal(err.code, status[codeName]);
  return true;
}

describe('inference service through the Node client', { skip }, () => {
  /** @type {string} */
  let modelDir;
  /** @type {import('./harness').ServerProcess} */
  let tokenizer;
  /** @type {import('./harness').ServerProcess} */
  let inference;
  /** @type {KuiperClient} */
  let client;
  /** @type {any} */
  let oracleInfo;

  before(async () => {
    modelDir = makeModelDir();
    oracleInfo = pythonJson([ORACLE], { dir: modelDir });
    tokenizer = await startServer('serve-tokenizer', ['--model', modelDir]);
    inference = await startServer('serve-inference', [
      '--model',
      modelDir,
      '--device',
      'cpu',
      '--tokenizer-address',
      tokenizer.address,
    ]);
    client = new KuiperClient({
      inferenceAddress: inference.address,
      tokenizerAddress: tokenizer.address,
      deadlineMs: 30_000,
    });
  });

  after(async () => {
    client?.close();
    const results = await Promise.all([inference?.stop(), tokenizer?.stop()]);
    const [inf] = results;
    if (inf) assert.equal(inf.code, 0, `inference server did not exit cleanly:\n${inference.log}`);
  });

  it('streams tokens, then a finish reason and usage that count them', async () => {
    const prompt = 'the other one';
    const chunks = await drain(client.generate(prompt, { maxNewTokens: 12, temperature: 0, ignoreEos: true }));
    // One message per step at most; the server merges the tokens that are ready when a
    // reader lags (docs/serving.md), so a fast engine may send all 12 in one message.
    assert.ok(chunks.length >= 1 && chunks.length <= 12, `got ${chunks.length} message(s)`);
    const last = chunks[chunks.length - 1];
    for (const c of chunks.slice(0, -1)) {
      assert.equal(c.finishReason, null, 'only the last message has a finish reason');
      assert.equal(c.usage, null, 'only the last message has usage');
    }
    assert.equal(last.finishReason, 'LENGTH');
    const ids = chunks.flatMap((c) => c.tokenIds);
    assert.equal(ids.length, 12);
    assert.ok(ids.every((id) => Number.isInteger(id) && id >= 0 && id < oracleInfo.vocab_size));
    assert.ok(last.usage);
    assert.equal(last.usage.completionTokens, ids.length);
    const promptIds = pythonJson([ORACLE], { dir: modelDir, encode: [[prompt, true]] }).encode[0];
    assert.equal(last.usage.promptTokens, promptIds.length);
    assert.ok(last.usage.timeToFirstTokenS > 0);
  });

  it('streams text deltas whose concatenation is the decoded ids', async () => {
    const chunks = await drain(
      client.generate('hello there', { maxNewTokens: 16, temperature: 0, ignoreEos: true }),
    );
    const ids = chunks.flatMap((c) => c.tokenIds);
    const text = chunks.map((c) => c.text).join('');
    const oracle = pythonJson([ORACLE], { dir: modelDir, decode: [[ids, true], [ids, false]] });
    assert.ok(
      oracle.decode.includes(text),
      `streamed text ${JSON.stringify(text)} is neither decoding of ${JSON.stringify(ids)}: ` +
        JSON.stringify(oracle.decode),
    );
  });

  it('greedy: a token-id prompt gives the ids of the same text prompt, and repeats', async () => {
    const sampling = { maxNewTokens: 10, temperature: 0, ignoreEos: true };
    const byText = await client.generateText('an entire world', sampling);
    const promptIds = await client.encode('an entire world');
    const byIds = await client.generateText(promptIds, sampling);
    const again = await client.generateText('an entire world', sampling);
    assert.deepEqual(byIds.tokenIds, byText.tokenIds);
    assert.deepEqual(again.tokenIds, byText.tokenIds);
    assert.equal(byIds.usage?.promptTokens, promptIds.length);
  });

  it('gets the same greedy ids as the Python client', { skip: !commands.has('generate') }, () => {
    const sampling = { maxNewTokens: 8, temperature: 0, ignoreEos: true };
    return client.generateText('once upon a time', sampling).then((ours) => {
      const out = execFileSync(
        pythonExe(),
        ['-m', 'kuiper_serve.cli', 'generate', '--address', inference.address,
          '--max-new-tokens', '8', '--temperature', '0', '--json', 'once upon a time'],
        { encoding: 'utf8' },
      );
      const theirs = JSON.parse(out.trim().split('\n').pop() || '{}');
      // --json has no ignore_eos flag: compare up to where the Python run stopped.
      assert.deepEqual(ours.tokenIds.slice(0, theirs.token_ids.length), theirs.token_ids);

      // examples/generate.js --json prints the same object, key for key.
      const example = execFileSync(
        process.execPath,
        [path.join(__dirname, '..', 'examples', 'generate.js'), '--address', inference.address,
          '--max-new-tokens', '8', '--temperature', '0', '--json', 'once upon a time'],
        { encoding: 'utf8' },
      );
      const node = JSON.parse(example.trim());
      assert.deepEqual(Object.keys(node).sort(), Object.keys(theirs).sort());
      assert.deepEqual(Object.keys(node.usage).sort(), Object.keys(theirs.usage).sort());
      assert.deepEqual(node.token_ids, theirs.token_ids);
      assert.equal(node.text, theirs.text);
      assert.equal(node.finish_reason, theirs.finish_reason);
      assert.match(node.finish_reason, /^(length|stop|eos)$/);
      assert.equal(node.usage.completion_tokens, theirs.usage.completion_tokens);
    });
  });

  it('runs the README API example as written', () => {
    const readme = fs.readFileSync(path.join(__dirname, '..', 'README.md'), 'utf8');
    const block = readme.split('## API')[1].match(/```js\n([\s\S]*?)```/);
    assert.ok(block, 'README.md has a js block under ## API');
    // Ids mean something for one vocabulary only: the example gets them from encode.
    assert.doesNotMatch(block[1], /\[\s*\d+\s*,\s*\d+/, 'no hand-typed id lists');
    const script = block[1]
      .replace("require('@kuiper/client')", `require(${JSON.stringify(path.join(__dirname, '..', 'src'))})`)
      .replace("'localhost:50051'", JSON.stringify(inference.address))
      .replace("'localhost:50052'", JSON.stringify(tokenizer.address));
    const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'kuiper-readme-')), 'example.js');
    fs.writeFileSync(file, script);
    const out = execFileSync(process.execPath, [file], { encoding: 'utf8', timeout: 60_000 });
    assert.match(out, /\[LENGTH\]/);
    assert.match(out, /^true \d+$/m, 'DecodeStream text equals decode()');
    assert.match(out, /INVALID_ARGUMENT /);
  });

  it('stops at a stop token id and reports STOP', async () => {
    const free = await client.generateText('the', { maxNewTokens: 6, temperature: 0, ignoreEos: true });
    const stopId = free.tokenIds[2];
    const first = free.tokenIds.indexOf(stopId);
    const stopped = await client.generateText('the', {
      maxNewTokens: 6,
      temperature: 0,
      ignoreEos: true,
      stopTokenIds: [stopId],
    });
    assert.equal(stopped.finishReason, 'STOP');
    assert.deepEqual(stopped.tokenIds, free.tokenIds.slice(0, first + 1));
  });

  it('chats through the model chat template', async () => {
    const messages = [{ role: 'user', content: 'Say something.' }];
    const chunks = await drain(client.chat(messages, { maxNewTokens: 5, temperature: 0, ignoreEos: true }));
    const last = chunks[chunks.length - 1];
    assert.equal(last.finishReason, 'LENGTH');
    const rendered = pythonJson([ORACLE], { dir: modelDir, chat: [[messages, true]] }).chat[0];
    const renderedIds = pythonJson([ORACLE], { dir: modelDir, encode: [[rendered, false]] }).encode[0];
    assert.equal(last.usage?.promptTokens, renderedIds.length);
    assert.equal(last.usage?.completionTokens, 5);
  });

  it('describes the loaded model', async () => {
    const info = await client.modelInfo();
    assert.equal(info.vocabSize, oracleInfo.vocab_size);
    assert.equal(info.architecture, 'llama');
    assert.equal(info.numLayers, 2);
    assert.equal(info.hiddenSize, 32);
    assert.equal(info.numHeads, 4);
    assert.equal(info.numKvHeads, 2);
    assert.equal(info.contextLength, 256);
    assert.match(info.device, /^cpu/);
  });

  it('answers bad requests with INVALID_ARGUMENT and keeps serving', async () => {
    const bad = [
      () => drain(client.generate('x', { temperature: -1 })),
      () => drain(client.generate('x', { topP: 1.5 })),
      () => drain(client.generate('x', { topK: -3 })),
      () => drain(client.generate([1, oracleInfo.vocab_size + 10])),
      () => drain(client.generate('', {})),
      () => drain(client.generate('x', { maxNewTokens: 100_000 })),
      () => drain(client.chat([{ role: 'nobody-knows-me', content: 'x' }], {})),
    ];
    for (const call of bad) await assert.rejects(call, (err) => isCode(err, 'INVALID_ARGUMENT'));
    const ok = await client.generateText('fine', { maxNewTokens: 3, temperature: 0, ignoreEos: true });
    assert.equal(ok.tokenIds.length, 3);
  });

  it('cancels on early break and on abort; deadlines surface as DEADLINE_EXCEEDED', async () => {
    for await (const chunk of client.generate('long story', { maxNewTokens: 200, ignoreEos: true })) {
      assert.ok(chunk.tokenIds.length >= 0);
      break; // the client cancels the call here
    }
    // Aborted before its first message: aborting after one can come too late on a loaded
    // machine, where the tiny model's whole answer and status arrive before the client reads.
    const ac = new AbortController();
    const aborted = client.generate('x', { maxNewTokens: 200, ignoreEos: true }, { signal: ac.signal });
    ac.abort();
    await assert.rejects(drain(aborted), (err) => isCode(err, 'CANCELLED'));
    await assert.rejects(
      drain(client.generate('x', { maxNewTokens: 200, ignoreEos: true }, { deadlineMs: 1 })),
      (err) => isCode(err, 'DEADLINE_EXCEEDED'),
    );
    const ok = await client.generateText('after', { maxNewTokens: 2, temperature: 0, ignoreEos: true });
    assert.equal(ok.finishReason, 'LENGTH');
    assert.equal(await client.health('inference'), 'SERVING');
  });
});
