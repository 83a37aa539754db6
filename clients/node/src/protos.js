'use strict';
// Loads the kuiper.v1 protocol at runtime from .proto files (no generated code), so the
// client always speaks exactly the protocol in the repository's protos/ folder.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_FILES = ['kuiper/v1/tokenizer.proto', 'kuiper/v1/inference.proto'];
const HEALTH_DIR = path.join(__dirname, 'health');

// camelCase fields, uint64 as decimal strings (no precision loss), enums by name,
// defaults and empty arrays filled in, oneofs tagged with the field that is set.
const LOADER_OPTIONS = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  arrays: true,
  oneofs: true,
};

/**
 * Where the .proto files live: an explicit dir, $KUIPER_PROTO_DIR, the repository's top-level
 * `protos/` folder (when the package sits in the kuiper-serve repo), or the copy `npm pack`
 * bundles into the package (`protos/` next to `src/`).
 * @param {string} [protoDir]
 * @returns {string}
 */
function findProtoDir(protoDir) {
  const candidates = /** @type {string[]} */ (
    protoDir
      ? [protoDir]
      : [
          process.env.KUIPER_PROTO_DIR,
          path.resolve(__dirname, '..', '..', '..', 'protos'),
          path.resolve(__dirname, '..', 'protos'),
        ].filter(Boolean)
  );
  for (const dir of candidates) {
    if (fs.existsSync(path.join(dir, PROTO_FILES[0]))) return path.resolve(dir);
  }
  throw new Error(
    `kuiper.v1 protos not found (looked for ${PROTO_FILES[0]} under: ${candidates.join(', ')}); ` +
      'pass {protoDir} to KuiperClient or set KUIPER_PROTO_DIR',
  );
}

const cache = new Map();

/**
 * Load the kuiper.v1 and grpc.health.v1 packages (cached per proto dir).
 * @param {string} [protoDir]
 * @returns {{v1: any, health: any, definition: import('@grpc/proto-loader').PackageDefinition, protoDir: string}}
 */
function loadProtos(protoDir) {
  const dir = findProtoDir(protoDir);
  let loaded = cache.get(dir);
  if (!loaded) {
    const definition = protoLoader.loadSync(PROTO_FILES, { ...LOADER_OPTIONS, includeDirs: [dir] });
    const healthDef = protoLoader.loadSync('health.proto', {
      ...LOADER_OPTIONS,
      includeDirs: [HEALTH_DIR],
    });
    loaded = {
      v1: /** @type {any} */ (grpc.loadPackageDefinition(definition)).kuiper.v1,
      health: /** @type {any} */ (grpc.loadPackageDefinition(healthDef)).grpc.health.v1,
      definition,
      protoDir: dir,
    };
    cache.set(dir, loaded);
  }
  return loaded;
}

module.exports = { loadProtos, findProtoDir, PROTO_FILES };
