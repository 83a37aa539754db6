'use strict';
// Test harness: builds the tiny model folder, starts the real Python servers as subprocesses
// on free loopback ports, and asks the `tokenizers` library (the oracle) for expected results.

const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { KuiperClient } = require('../src');

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');
const FIXTURES = path.join(__dirname, 'fixtures');

/** KUIPER_PYTHON, else the repository's .venv, else python3 from PATH. */
function pythonExe() {
  if (process.env.KUIPER_PYTHON) return process.env.KUIPER_PYTHON;
  const venv = path.join(REPO_ROOT, '.venv', 'bin', 'python');
  return fs.existsSync(venv) ? venv : 'python3';
}

/**
 * Run Python with JSON on stdin, parse JSON from stdout.
 * @param {string[]} args
 * @param {unknown} [input]
 */
function pythonJson(args, input) {
  const out = execFileSync(pythonExe(), args, {
    input: input === undefined ? '' : JSON.stringify(input),
    encoding: 'utf8',
    stdio: ['pipe', 'pipe', 'inherit'],
    maxBuffer: 64 << 20,
  });
  return JSON.parse(out);
}

/** Build the tiny model folder (tokenizer + random Llama weights) in a fresh temp dir. */
function makeModelDir() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kuiper-node-test-'));
  execFileSync(pythonExe(), [path.join(FIXTURES, 'make_model.py'), dir], { stdio: 'inherit' });
  return dir;
}

/** @returns {Promise<number>} a free loopback TCP port */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = /** @type {net.AddressInfo} */ (srv.address());
      srv.close(() => resolve(port));
    });
  });
}

/** Subcommands the `kuiper` CLI offers (some parts of the product may not be built yet). */
function cliCommands() {
  const help = execFileSync(pythonExe(), ['-m', 'kuiper_serve.cli', '--help'], {
    encoding: 'utf8',
  });
  return new Set([...help.matchAll(/^\s{4}([a-z][a-z0-9-]+)\s/gm)].map((m) => m[1]));
}

class ServerProcess {
  /**
   * @param {import('node:child_process').ChildProcess} child
   * @param {string} address
   * @param {string} name
   */
  constructor(child, address, name) {
    this.child = child;
    this.address = address;
    this.name = name;
    this.log = '';
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const keep = (/** @type {Buffer} */ buf) => {
      this.log = (this.log + buf.toString()).slice(-8000);
    };
    child.stdout?.on('data', keep);
    child.stderr?.on('data', keep);
  }

  /** SIGTERM (the server drains), SIGKILL if it is still there after graceMs. */
  async stop(graceMs = 10_000) {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.exited;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
    const result = await this.exited;
    clearTimeout(timer);
    return result;
  }
}

/**
 * Start `kuiper <command> ... --host 127.0.0.1 --port P` and wait until its health is SERVING.
 * @param {'serve-tokenizer' | 'serve-inference'} command
 * @param {string[]} args extra flags
 * @param {{timeoutMs?: number}} [options]
 * @returns {Promise<ServerProcess>}
 */
async function startServer(command, args, options = {}) {
  const { timeoutMs = 60_000 } = options;
  const port = await freePort();
  const metricsPort = await freePort();
  const argv = ['-m', 'kuiper_serve.cli', command, '--host', '127.0.0.1', '--port', String(port)];
  argv.push('--metrics-port', String(metricsPort), ...args);
  const child = spawn(pythonExe(), argv, {
    cwd: REPO_ROOT,
    env: { ...process.env, PYTHONUNBUFFERED: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const address = `127.0.0.1:${port}`;
  const server = new ServerProcess(child, address, command);
  server.metricsPort = metricsPort;
  const which = command === 'serve-tokenizer' ? 'tokenizer' : 'inference';
  const probe = new KuiperClient({ inferenceAddress: address, tokenizerAddress: address });
  const stopWaiting = new AbortController();
  const died = server.exited.then(({ code, signal }) => {
    stopWaiting.abort();
    throw new Error(`${command} exited (code ${code}, signal ${signal}) before serving`);
  });
  died.catch(() => {}); // only the race below cares; a later exit is not an error
  try {
    const ready = probe.waitUntilServing({ servers: [which], timeoutMs, signal: stopWaiting.signal });
    ready.catch(() => {}); // when the process died first, `died` carries the story
    await Promise.race([ready, died]);
  } catch (err) {
    stopWaiting.abort();
    await server.stop(2000);
    throw new Error(`${/** @type {Error} */ (err).message}\n--- ${command} output ---\n${server.log}`);
  } finally {
    probe.close();
  }
  return server;
}

module.exports = {
  REPO_ROOT,
  pythonExe,
  pythonJson,
  makeModelDir,
  freePort,
  cliCommands,
  startServer,
};
