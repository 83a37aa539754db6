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

  it('decodeStream: one id at a time joins to the library decoding, never splitting a character', async () => {
    for (const text of ['naïve 你好 🙂 ok', ...texts.slice(0, 20)]) {
      const ids = await client.encode(text, { addSpecialTokens: false });
      const stream = client.decodeStream();
      const deltas = [];
      for (const id of ids) deltas.push(await stream.push([id]));
      deltas.push(await stream.finish());
      await stream.close();
      const oracle = pythonJson([ORACLE], { dir: modelDir, decode: [[ids, false]] }).decode[0];
      assert.equal(deltas.join(''), oracle);
      for (const d of deltas) assert.ok(!d.includes('\uFFFD'), `a delta split a character: ${JSON.stringify(deltas)}`);
    }
  });

  it('decodeStream multiplexes sequences and uses context ids', async () => {
    const [a, b] = await client.encode(['hello world', 'ça va 🙂'], { addSpecialTokens: false });
    const stream = client.decodeStream();
    const got = { 7: '', '18446744073709551615': '' };
    const steps = Math.max(a.length, b.length);
    for (let i = 0; i < steps; i++) {
      const deltas = await stream.send([
        { sequenceId: 7, ids: a.slice(i, i + 1), finished: i === steps - 1 },
        { sequenceId: 2n ** 64n - 1n, ids: b.slice(i, i + 1), finished: i === steps - 1 },
      ]);
      assert.deepEqual(deltas.map((d) => d.sequenceId), ['7', '18446744073709551615']);
      got[7] += deltas[0].text;
      got['18446744073709551615'] += deltas[1].text;
    }
    const oracle = pythonJson([ORACLE], { dir: modelDir, decode: [[a, false], [b, false]] }).decode;
    assert.deepEqual([got[7], got['18446744073709551615']], oracle);
    // Context: ' world' after 'hello' streams as the tail of decode('hello world').
    const tail = await stream.push(a.slice(1), { sequenceId: 9, contextIds: a.slice(0, 1) });
    const whole = pythonJson([ORACLE], { dir: modelDir, decode: [[a, false], [a.slice(0, 1), false]] }).decode;
    assert.equal(tail + (await stream.finish({ sequenceId: 9 })), whole[0].slice(whole[1].length));
    await stream.close();
    assert.throws(() => stream.send([{ sequenceId: -1, ids: [] }]), /sequenceId must be an integer/);
  });

  it('decodeStream: a bad id fails the stream with INVALID_ARGUMENT, later sends too', async () => {
    const info = await client.tokenizerInfo();
    const stream = client.decodeStream();
    const isInvalid = (/** @type {any} */ err) => {
      assert.ok(err instanceof KuiperError, `expected a KuiperError, got ${err}`);
      assert.equal(err.codeName, 'INVALID_ARGUMENT');
      assert.match(err.details, new RegExp(String(info.vocabSize)));
      return true;
    };
    await assert.rejects(stream.push([info.vocabSize]), isInvalid);
    await assert.rejects(stream.push([1]), isInvalid);
    const fresh = client.decodeStream(); // the service itself is fine
    assert.equal((await fresh.push(await client.encode('ok', { addSpecialTokens: false }))) + (await fresh.finish()), 'ok');
    await fresh.close();
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
