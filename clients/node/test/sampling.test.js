'use strict';
// Integer sampling fields are checked against their proto types before any call: protobufjs
// would silently wrap -5 into 4294967291 (and the server would then blame the context length).

const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { KuiperClient } = require('../src');

describe('sampling values the proto cannot hold', () => {
  // Nothing listens here; a request that got as far as the network would fail differently.
  const client = new KuiperClient({ inferenceAddress: '127.0.0.1:1', deadlineMs: 1000 });

  const cases = [
    [{ maxNewTokens: -5 }, /maxNewTokens must be an integer in \[0, 4294967295\], got -5/],
    [{ maxNewTokens: 2 ** 32 }, /maxNewTokens/],
    [{ maxNewTokens: 1.5 }, /maxNewTokens/],
    [{ seed: -1 }, /seed must be an integer in \[0, 18446744073709551615\]/],
    [{ seed: '18446744073709551616' }, /seed/],
    [{ seed: 'abc' }, /seed/],
    [{ topK: 2 ** 31 }, /topK/],
    [{ logprobs: -1 }, /logprobs/],
    [{ stopTokenIds: [-3] }, /stopTokenIds/],
  ];
  for (const [sampling, message] of cases) {
    it(`refuses ${JSON.stringify(sampling)}`, () => {
      assert.throws(() => client.generate('hi', sampling), message);
      assert.throws(() => client.chat([{ role: 'user', content: 'hi' }], sampling), message);
    });
  }

  it('accepts the extremes the fields hold', () => {
    const extremes = { maxNewTokens: 2 ** 32 - 1, seed: 2n ** 64n - 1n, topK: -1, logprobs: 0 };
    assert.deepEqual(client._sampling(extremes), { ...extremes, seed: '18446744073709551615' });
    client.close();
  });
});
