'use strict';
// The protocol the client loads at runtime is the one the Python servers are generated from.

const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const os = require('node:os');
const { loadProtos, findProtoDir, KuiperClient } = require('../src');
const { pythonJson } = require('./harness');

const PY_DESCRIBE = `
import json
from kuiper.v1 import inference_pb2, tokenizer_pb2
out = {}
for mod in (inference_pb2, tokenizer_pb2):
    for svc in mod.DESCRIPTOR.services_by_name.values():
        out[svc.full_name] = {
            m.name: [m.input_type.full_name, m.output_type.full_name,
                     m.client_streaming, m.server_streaming]
            for m in svc.methods
        }
print(json.dumps(out))
`;

describe('runtime proto loading', () => {
  it('loads the same services and methods as the generated Python modules', () => {
    const python = pythonJson(['-c', PY_DESCRIBE]);
    const { definition } = loadProtos();
    for (const [service, methods] of Object.entries(python)) {
      const svc = /** @type {any} */ (definition[service]);
      assert.ok(svc, `Node did not load ${service}`);
      assert.deepEqual(Object.keys(svc).sort(), Object.keys(methods).sort(), service);
      for (const [name, [input, output, clientStreaming, serverStreaming]] of Object.entries(methods)) {
        const m = svc[name];
        assert.equal(m.path, `/${service}/${name}`);
        assert.equal(m.requestStream, clientStreaming, `${service}.${name} client streaming`);
        assert.equal(m.responseStream, serverStreaming, `${service}.${name} server streaming`);
        assert.equal(`kuiper.v1.${m.requestType.type.name}`, input);
        assert.equal(`kuiper.v1.${m.responseType.type.name}`, output);
      }
    }
  });

  it('says where it looked when the protos are missing', () => {
    const nowhere = os.tmpdir();
    assert.throws(() => findProtoDir(nowhere), /kuiper\/v1\/tokenizer\.proto.*protoDir/s);
    assert.throws(() => new KuiperClient({ protoDir: nowhere }), /KUIPER_PROTO_DIR/);
  });

  it('rejects unknown sampling parameters and malformed prompts before any call', () => {
    const client = new KuiperClient({ inferenceAddress: '127.0.0.1:1' });
    try {
      assert.throws(() => client.generate('x', /** @type {any} */ ({ max_new_tokens: 5 })), /maxNewTokens/);
      assert.throws(() => client.generate(/** @type {any} */ ({ text: 'x' })), TypeError);
      assert.throws(() => client.generate([1, -2]), TypeError);
      assert.throws(() => client.chat(/** @type {any} */ ([{ role: 'user' }])), TypeError);
    } finally {
      client.close();
    }
  });
});
