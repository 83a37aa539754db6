#!/usr/bin/env node
'use strict';
// `npm pack` / `npm publish` hook: copy the kuiper.v1 .proto files from the repository into the
// package (protos/kuiper/v1/*.proto), so an installed package needs no repository checkout.

const fs = require('node:fs');
const path = require('node:path');

const src = path.resolve(__dirname, '..', '..', '..', 'protos', 'kuiper', 'v1');
const dst = path.resolve(__dirname, '..', 'protos', 'kuiper', 'v1');
fs.rmSync(path.resolve(__dirname, '..', 'protos'), { recursive: true, force: true });
fs.mkdirSync(dst, { recursive: true });
for (const name of fs.readdirSync(src).filter((n) => n.endsWith('.proto'))) {
  fs.copyFileSync(path.join(src, name), path.join(dst, name));
}
console.log(`bundled ${fs.readdirSync(dst).join(', ')} into ${path.relative(process.cwd(), dst)}`);
