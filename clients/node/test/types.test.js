'use strict';
// The TypeScript declarations (types/, written by `npm run types` from the JSDoc in src/) are
// current, a TypeScript program compiles against the package by name, and the package's
// `exports` serve the same module as src/.

const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const ROOT = path.resolve(__dirname, '..');
const TSC = path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
const skip = fs.existsSync(TSC) ? false : 'typescript missing: run `npm install` in clients/node';

/** @param {string[]} args */
function tsc(args) {
  try {
    execFileSync(process.execPath, [TSC, ...args], { cwd: ROOT, encoding: 'utf8' });
  } catch (err) {
    assert.fail(`tsc ${args.join(' ')} failed:\n${/** @type {any} */ (err).stdout}`);
  }
}

describe('TypeScript declarations', { skip }, () => {
  it('types/ is what `npm run types` writes from src/ (which also type-checks)', () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'kuiper-types-'));
    tsc(['-p', 'tsconfig.json', '--outDir', out]);
    const fresh = fs.readdirSync(out).sort();
    assert.deepEqual(fs.readdirSync(path.join(ROOT, 'types')).sort(), fresh);
    for (const name of fresh) {
      const committed = fs.readFileSync(path.join(ROOT, 'types', name), 'utf8');
      assert.equal(committed, fs.readFileSync(path.join(out, name), 'utf8'), `types/${name} is stale: npm run types`);
    }
  });

  it('a strict TypeScript program compiles against @kuiper/client (and misuse does not)', () => {
    tsc(['--noEmit', '--strict', '--module', 'node16', '--moduleResolution', 'node16',
      '--target', 'es2022', '--types', 'node', 'test/types/usage.ts']);
  });
});

describe('package entry points', () => {
  it('`exports` serves src/index.js, and every runtime export is declared', () => {
    const byName = require('@kuiper/client'); // self-reference through package.json exports
    assert.equal(byName, require('../src'));
    const pkg = require('../package.json');
    assert.equal(pkg.types, 'types/index.d.ts');
    assert.equal(pkg.exports['.'].types, './types/index.d.ts');
    const declared = fs.readFileSync(path.join(ROOT, pkg.types), 'utf8');
    const exported = declared.match(/^export \{ (.+) \};$/m);
    assert.ok(exported, 'types/index.d.ts has one export list');
    assert.deepEqual(exported[1].split(', ').sort(), Object.keys(byName).sort());
  });

  it('ships its README and LICENSE', () => {
    for (const name of ['README.md', 'LICENSE']) {
      assert.ok(fs.statSync(path.join(ROOT, name)).size > 200, `${name} missing or empty`);
    }
    const license = fs.readFileSync(path.join(ROOT, 'LICENSE'), 'utf8');
    assert.match(license, /Apache License\s+Version 2\.0/);
    assert.equal(require('../package.json').license, 'Apache-2.0');
  });
});
