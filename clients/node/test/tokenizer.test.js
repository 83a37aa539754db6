'use strict';
// The Node client against the real tokenizer service, checked against the `tokenizers`
// library itself (fixtures/oracle.py), which knows nothing of kuiper.

const { before, after, describe, it } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { KuiperClient, KuiperError, status } = require('../src');
const { cliCommands, makeModelDir, pythonJson, startServer } = require('./harness');
const { FIXED, randomStrings, randomIdSequences } = require('./corpus');

const ORACLE = path.join(__dirname, 'fixtures', 'oracle.py');
const skip = cliCommands().has('serve-tokenizer')
  ? false
  : '`kuiper serve-tokenizer` is not registered in the CLI yet (tokenizer service not built)';

describe('tokenizer service through the Node client', { skip }, () => {
  /** @type {string} */
  let modelDir;
  /** @type {import('./harness').ServerProcess} */
  let server;
  /** @type {KuiperClient} */
  let client;
  const texts = [...FIXED, ...randomStrings(60)];

  before(async () => {
    modelDir = makeModelDir();
    server = await startServer('serve-tokenizer', ['--model', modelDir]);
    client = new KuiperClient({ tokenizerAddress: server.address, deadlineMs: 20_000 });
  });

  after(async () => {
    client?.close();
    if (server) {
      const { code } = await server.stop();
      assert.equal(code, 0, `tokenizer server did not exit cleanly on SIGTERM:\n${server.log}`);
    }
  });

  it('encodes exactly as the tokenizers library (with and without special tokens)', async () => {
    const oracle = pythonJson([ORACLE], {
      dir: modelDir,
      encode: [...texts.map((t) => [t, true]), ...texts.map((t) => [t, false])],
    });
    const withSpecial = await client.encode(texts);
    const plain = await client.encode(texts, { addSpecialTokens: false });
    assert.deepEqual(withSpecial, oracle.encode.slice(0, texts.length));
    assert.deepEqual(plain, oracle.encode.slice(texts.length));
    // A single string returns a single id list, and the default adds special tokens.
    assert.deepEqual(await client.encode(texts[0]), oracle.encode[0]);
    assert.notDeepEqual(withSpecial[0], plain[0], 'the fixture tokenizer adds <s>');
  });

  it('decodes exactly as the tokenizers library, random ids and special tokens included', async () => {
    const info = pythonJson([ORACLE], { dir: modelDir });
    const seqs = randomIdSequences(80, info.vocab_size);
    const oracle = pythonJson([ORACLE], {
      dir: modelDir,
      decode: [...seqs.map((s) => [s, false]), ...seqs.map((s) => [s, true])],
    });
    assert.deepEqual(await client.decode(seqs), oracle.decode.slice(0, seqs.length));
    assert.deepEqual(
      await client.decode(seqs, { skipSpecialTokens: true }),
      oracle.decode.slice(seqs.length),
    );
    assert.equal(await client.decode(seqs[1]), oracle.decode[1]);
  });

  it('round-trips text through encode and decode', async () => {
    const ids = await client.encode(texts, { addSpecialTokens: false });
    assert.deepEqual(await client.decode(ids), texts);
  });

  it('reports the vocabulary and special tokens the library sees', async () => {
    const oracle = pythonJson([ORACLE], { dir: modelDir });
    const info = await client.tokenizerInfo();
    assert.equal(info.vocabSize, oracle.vocab_size);
    assert.equal(info.bosId, oracle.specials['<s>']);
    assert.equal(info.eosId, oracle.specials['</s>']);
    assert.equal(info.hasChatTemplate, true);
    const specials = Object.fromEntries(info.specialTokens.map((t) => [t.content, t.id]));
    for (const [content, id] of Object.entries(oracle.specials)) assert.equal(specials[content], id);
  });

  it('renders the chat template as jinja2 does', async () => {
    const messages = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'What is 2+2? 你好 🙂' },
    ];
    const oracle = pythonJson([ORACLE], { dir: modelDir, chat: [[messages, true]] });
    const rendered = await client.applyChatTemplate(messages);
    assert.equal(rendered.text, oracle.chat[0]);
    const ids = pythonJson([ORACLE], { dir: modelDir, encode: [[oracle.chat[0], false]] }).encode[0];
    assert.deepEqual(rendered.ids, ids);
  });

  it('answers bad requests with INVALID_ARGUMENT and keeps serving', async () => {
    const info = await client.tokenizerInfo();
    const bad = [
      () => client.decode([1, 2, info.vocabSize + 5]),
      () => client.encode([]),
      () => client.decode([[5, 6], [info.vocabSize]]),
    ];
    for (const call of bad) {
      await assert.rejects(call, (/** @type {any} */ err) => {
        assert.ok(err instanceof KuiperError, `expected a KuiperError, got ${err}`);
        assert.equal(err.code, status.INVALID_ARGUMENT);
        assert.equal(err.codeName, 'INVALID_ARGUMENT');
        assert.match(err.message, /^INVALID_ARGUMENT: .+/);
        assert.ok(err.details.length > 0, 'the message says what is wrong');
        return true;
      });
    }
    const ids = await client.encode('still here', { addSpecialTokens: false });
    assert.equal(await client.decode(ids), 'still here');
  });

  it('reports SERVING health and surfaces UNAVAILABLE for a dead address', async () => {
    assert.equal(await client.health('tokenizer'), 'SERVING');
    const dead = new KuiperClient({ tokenizerAddress: '127.0.0.1:1', deadlineMs: 2000 });
    try {
      await assert.rejects(dead.encode('x'), (/** @type {any} */ err) => {
        assert.ok(err instanceof KuiperError);
        assert.equal(err.codeName, 'UNAVAILABLE');
        return true;
      });
    } finally {
      dead.close();
    }
  });
});
