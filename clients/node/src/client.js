'use strict';
// KuiperClient: a thin, promise/async-iterator API over the kuiper.v1 gRPC services.

const grpc = require('@grpc/grpc-js');
const { loadProtos } = require('./protos');
const { toKuiperError } = require('./errors');

/**
 * @typedef {object} KuiperClientOptions
 * @property {string} [inferenceAddress] host:port of the inference service (default localhost:50051)
 * @property {string} [tokenizerAddress] host:port of the tokenizer service (default localhost:50052)
 * @property {number} [deadlineMs] deadline of every call, a whole stream included (default 60000; 0 = none)
 * @property {string} [protoDir] folder holding kuiper/v1/*.proto (default: $KUIPER_PROTO_DIR, the
 *   package's own protos/ copy, or the repository's protos/ folder)
 * @property {boolean | {rootCerts?: Buffer, privateKey?: Buffer, certChain?: Buffer}} [tls] use TLS
 *   (true: system roots; an object: custom roots and optional client certificate)
 * @property {string} [token] bearer token, sent as `authorization: Bearer <token>`
 * @property {Record<string, any>} [channelOptions] extra grpc-js channel options
 */

/**
 * Sampling parameters (kuiper.v1.SamplingParams, camelCase). Omitted fields take the server's
 * defaults: temperature 1.0, top_p 1.0, repetition_penalty 1.0, random seed.
 * @typedef {object} SamplingParams
 * @property {number} [maxNewTokens] 0 = server default (256), capped by the context length
 * @property {number} [temperature] 0 = greedy
 * @property {number} [topK] 0 disables
 * @property {number} [topP] in (0, 1]
 * @property {number} [minP] in [0, 1]
 * @property {number} [repetitionPenalty]
 * @property {number | string | bigint} [seed] uint64
 * @property {string[]} [stop] stop strings (not included in the returned text)
 * @property {number[]} [stopTokenIds]
 * @property {boolean} [ignoreEos]
 * @property {number} [logprobs] also return this many top alternatives per token
 */

/**
 * @typedef {object} CallOptions
 * @property {number} [deadlineMs] overrides the client's deadline for this call
 * @property {AbortSignal} [signal] aborting cancels the call (the stream ends with CANCELLED)
 */

/**
 * @typedef {object} GenerateOptions
 * @property {number} [deadlineMs]
 * @property {AbortSignal} [signal]
 * @property {string} [requestId] echoed in server logs and metrics
 * @property {boolean} [addSpecialTokens] text prompts: add BOS as the tokenizer does (default true)
 */

/**
 * @typedef {object} Usage
 * @property {number} promptTokens
 * @property {number} completionTokens
 * @property {number} timeToFirstTokenS
 * @property {number} queueTimeS
 * @property {number} cachedPromptTokens
 */

/**
 * @typedef {{tokenId: number, logprob: number, top: {tokenId: number, logprob: number}[]}} TokenLogprob
 */

/**
 * One streamed message of Generate/Chat.
 * @typedef {object} GenerateChunk
 * @property {number[]} tokenIds ids generated since the previous chunk
 * @property {string} text text generated since the previous chunk (may be "")
 * @property {TokenLogprob[]} logprobs one per id, when logprobs was requested
 * @property {'LENGTH' | 'STOP' | 'EOS' | 'CANCELLED' | null} finishReason set on the last chunk only
 * @property {Usage | null} usage set on the last chunk only
 */

/**
 * @typedef {object} GenerateResult
 * @property {number[]} tokenIds
 * @property {string} text
 * @property {'LENGTH' | 'STOP' | 'EOS' | 'CANCELLED' | null} finishReason
 * @property {Usage | null} usage
 */

/** @typedef {{role: string, content: string}} ChatMessage */

/**
 * @typedef {object} TokenizerInfo
 * @property {number} vocabSize
 * @property {number | null} bosId
 * @property {number | null} eosId
 * @property {number | null} padId
 * @property {{id: number, content: string}[]} specialTokens
 * @property {boolean} hasChatTemplate
 * @property {string} backend "hf-tokenizers", "sentencepiece" or "gguf"
 * @property {string} source
 * @property {number[]} stopIds every id that ends generation
 */

/**
 * @typedef {object} ModelInfo
 * @property {string} model
 * @property {string} architecture
 * @property {number} vocabSize
 * @property {number} contextLength
 * @property {number} numLayers
 * @property {number} hiddenSize
 * @property {number} numHeads
 * @property {number} numKvHeads
 * @property {string} dtype
 * @property {string} device
 * @property {number} kvBlockSize
 * @property {number} kvBlocksTotal
 * @property {number} maxBatchSize
 */

const DEFAULT_DEADLINE_MS = 60_000;
const FINISH_PREFIX = 'FINISH_REASON_';

class KuiperClient {
  /** @param {KuiperClientOptions} [options] */
  constructor(options = {}) {
    const {
      inferenceAddress = 'localhost:50051',
      tokenizerAddress = 'localhost:50052',
      deadlineMs = DEFAULT_DEADLINE_MS,
      protoDir,
      tls = false,
      token,
      channelOptions = {},
    } = options;
    const protos = loadProtos(protoDir);
    this.inferenceAddress = inferenceAddress;
    this.tokenizerAddress = tokenizerAddress;
    this.deadlineMs = deadlineMs;
    /** @private */
    this._token = token;
    const samplingType = /** @type {any} */ (protos.definition['kuiper.v1.SamplingParams']).type;
    /** @private */
    this._samplingFields = new Set(samplingType.field.map((/** @type {any} */ f) => f.name));
    const creds = makeCredentials(tls);
    /** @private */
    this._inference = new protos.v1.InferenceService(inferenceAddress, creds, channelOptions);
    /** @private */
    this._tokenizer = new protos.v1.TokenizerService(tokenizerAddress, creds, channelOptions);
    /** @private */
    this._health = {
      inference: new protos.health.Health(inferenceAddress, creds, channelOptions),
      tokenizer: new protos.health.Health(tokenizerAddress, creds, channelOptions),
    };
  }

  // ---- inference service --------------------------------------------------------------

  /**
   * Stream a continuation of a prompt (text, or token ids). Breaking out of the loop cancels
   * the request on the server.
   * @param {string | number[]} prompt
   * @param {SamplingParams} [sampling]
   * @param {GenerateOptions} [options]
   * @returns {AsyncGenerator<GenerateChunk, void, undefined>}
   */
  generate(prompt, sampling = {}, options = {}) {
    /** @type {Record<string, any>} */
    const request = { sampling: this._sampling(sampling) };
    if (typeof prompt === 'string') request.text = prompt;
    else if (Array.isArray(prompt)) request.tokenIds = { ids: checkIds(prompt, 'prompt') };
    else throw new TypeError('prompt must be a string or an array of token ids');
    if (options.requestId !== undefined) request.requestId = String(options.requestId);
    if (options.addSpecialTokens !== undefined) request.addSpecialTokens = !!options.addSpecialTokens;
    return this._stream('generate', request, options);
  }

  /**
   * Render messages with the model's chat template, then stream the answer.
   * @param {ChatMessage[]} messages
   * @param {SamplingParams} [sampling]
   * @param {GenerateOptions} [options]
   * @returns {AsyncGenerator<GenerateChunk, void, undefined>}
   */
  chat(messages, sampling = {}, options = {}) {
    /** @type {Record<string, any>} */
    const request = { messages: checkMessages(messages), sampling: this._sampling(sampling) };
    if (options.requestId !== undefined) request.requestId = String(options.requestId);
    return this._stream('chat', request, options);
  }

  /**
   * Generate and collect the whole answer.
   * @param {string | number[]} prompt
   * @param {SamplingParams} [sampling]
   * @param {GenerateOptions} [options]
   * @returns {Promise<GenerateResult>}
   */
  async generateText(prompt, sampling = {}, options = {}) {
    return collect(this.generate(prompt, sampling, options));
  }

  /**
   * @param {CallOptions} [options]
   * @returns {Promise<ModelInfo>}
   */
  async modelInfo(options = {}) {
    return this._unary(this._inference, 'getModelInfo', {}, options);
  }

  // ---- tokenizer service --------------------------------------------------------------

  /**
   * Encode one text (→ ids) or a batch of texts (→ one id list per text).
   * @overload
   * @param {string} texts
   * @param {{addSpecialTokens?: boolean} & CallOptions} [options]
   * @returns {Promise<number[]>}
   */
  /**
   * @overload
   * @param {string[]} texts
   * @param {{addSpecialTokens?: boolean} & CallOptions} [options]
   * @returns {Promise<number[][]>}
   */
  /**
   * @param {string | string[]} texts
   * @param {{addSpecialTokens?: boolean} & CallOptions} [options]
   * @returns {Promise<number[] | number[][]>}
   */
  async encode(texts, options = {}) {
    const single = typeof texts === 'string';
    const list = single ? [texts] : texts;
    if (!Array.isArray(list) || list.some((t) => typeof t !== 'string')) {
      throw new TypeError('encode() takes a string or an array of strings');
    }
    /** @type {Record<string, any>} */
    const request = { texts: list };
    if (options.addSpecialTokens !== undefined) request.addSpecialTokens = !!options.addSpecialTokens;
    const res = await this._unary(this._tokenizer, 'encode', request, options);
    const ids = res.results.map((/** @type {{ids: number[]}} */ r) => r.ids);
    return single ? ids[0] : ids;
  }

  /**
   * Decode one id sequence (→ text) or a batch of sequences (→ one text each).
   * @overload
   * @param {number[]} ids
   * @param {{skipSpecialTokens?: boolean} & CallOptions} [options]
   * @returns {Promise<string>}
   */
  /**
   * @overload
   * @param {number[][]} ids
   * @param {{skipSpecialTokens?: boolean} & CallOptions} [options]
   * @returns {Promise<string[]>}
   */
  /**
   * @param {number[] | number[][]} ids
   * @param {{skipSpecialTokens?: boolean} & CallOptions} [options]
   * @returns {Promise<string | string[]>}
   */
  async decode(ids, options = {}) {
    if (!Array.isArray(ids)) throw new TypeError('decode() takes an array of ids or of id arrays');
    const batch = ids.length > 0 && ids.every(Array.isArray);
    const seqs = batch ? /** @type {number[][]} */ (ids) : [/** @type {number[]} */ (ids)];
    const request = {
      sequences: seqs.map((s) => ({ ids: checkIds(s, 'ids') })),
      skipSpecialTokens: !!options.skipSpecialTokens,
    };
    const res = await this._unary(this._tokenizer, 'decode', request, options);
    return batch ? res.texts : res.texts[0];
  }

  /**
   * Open a DecodeStream: incremental detokenization of one or many sequences over one
   * bidirectional call (what a server streaming tokens does). See {@link DecodeStream}.
   * @param {CallOptions} [options] the deadline covers the whole stream
   * @returns {DecodeStream}
   */
  decodeStream(options = {}) {
    const call = this._tokenizer.decodeStream(this._metadata(), this._callOptions(options));
    return new DecodeStream(call, options.signal);
  }

  /**
   * Render chat messages with the model's template (without generating).
   * @param {ChatMessage[]} messages
   * @param {{addGenerationPrompt?: boolean} & CallOptions} [options]
   * @returns {Promise<{text: string, ids: number[]}>}
   */
  async applyChatTemplate(messages, options = {}) {
    const request = {
      messages: checkMessages(messages),
      addGenerationPrompt: options.addGenerationPrompt ?? true,
    };
    return this._unary(this._tokenizer, 'applyChatTemplate', request, options);
  }

  /**
   * @param {CallOptions} [options]
   * @returns {Promise<TokenizerInfo>}
   */
  async tokenizerInfo(options = {}) {
    const res = await this._unary(this._tokenizer, 'getTokenizerInfo', {}, options);
    const optionalId = (/** @type {string} */ key) => (key in res ? res[key] : null);
    return {
      vocabSize: res.vocabSize,
      bosId: optionalId('bosId'),
      eosId: optionalId('eosId'),
      padId: optionalId('padId'),
      specialTokens: res.specialTokens,
      hasChatTemplate: res.hasChatTemplate,
      backend: res.backend,
      source: res.source,
      stopIds: res.stopIds,
    };
  }

  // ---- health and lifecycle -----------------------------------------------------------

  /**
   * grpc.health.v1 status of one server: "SERVING", "NOT_SERVING", ...
   * @param {'inference' | 'tokenizer'} server
   * @param {{service?: string} & CallOptions} [options] service name ('' = the whole server)
   * @returns {Promise<string>}
   */
  async health(server, options = {}) {
    const client = this._health[server];
    if (!client) throw new TypeError(`health() takes 'inference' or 'tokenizer', not ${server}`);
    const res = await this._unary(client, 'check', { service: options.service ?? '' }, options);
    return res.status;
  }

  /**
   * Poll health until every named server answers SERVING.
   * @param {{servers?: ('inference' | 'tokenizer')[], timeoutMs?: number, intervalMs?: number,
   *   signal?: AbortSignal}} [options] aborting the signal stops the wait
   * @returns {Promise<void>}
   */
  async waitUntilServing(options = {}) {
    const { servers = ['inference', 'tokenizer'], timeoutMs = 30_000, intervalMs = 100 } = options;
    const end = Date.now() + timeoutMs;
    for (const server of servers) {
      for (;;) {
        options.signal?.throwIfAborted();
        let last;
        try {
          last = await this.health(server, { deadlineMs: Math.max(200, intervalMs * 5) });
          if (last === 'SERVING') break;
        } catch (err) {
          last = /** @type {Error} */ (err).message;
        }
        if (Date.now() > end) {
          const address = server === 'inference' ? this.inferenceAddress : this.tokenizerAddress;
          throw new Error(`${server} server at ${address} not SERVING after ${timeoutMs} ms: ${last}`);
        }
        await new Promise((resolve) => setTimeout(resolve, intervalMs));
      }
    }
  }

  /** Close every channel. Calls in flight are cancelled. */
  close() {
    this._inference.close();
    this._tokenizer.close();
    this._health.inference.close();
    this._health.tokenizer.close();
  }

  // ---- internals ----------------------------------------------------------------------

  /** @private @param {SamplingParams} sampling */
  _sampling(sampling) {
    if (sampling === null || typeof sampling !== 'object') {
      throw new TypeError('sampling must be an object of SamplingParams');
    }
    /** @type {Record<string, any>} */
    const out = {};
    for (const [key, value] of Object.entries(sampling)) {
      if (!this._samplingFields.has(key)) {
        const known = [...this._samplingFields].join(', ');
        throw new TypeError(`unknown sampling parameter '${key}' (known: ${known})`);
      }
      if (value === undefined) continue;
      checkSamplingRange(key, value);
      out[key] = key === 'seed' ? String(value) : value;
    }
    return out;
  }

  /** @private */
  _metadata() {
    const md = new grpc.Metadata();
    if (this._token) md.set('authorization', `Bearer ${this._token}`);
    return md;
  }

  /** @private @param {CallOptions} options */
  _callOptions(options) {
    const ms = options.deadlineMs ?? this.deadlineMs;
    return ms && Number.isFinite(ms) && ms > 0 ? { deadline: Date.now() + ms } : {};
  }

  /**
   * @param {any} client
   * @param {string} method
   * @param {object} request
   * @param {CallOptions} options
   * @returns {Promise<any>}
   * @private
   */
  _unary(client, method, request, options) {
    return new Promise((resolve, reject) => {
      const call = client[method](
        request,
        this._metadata(),
        this._callOptions(options),
        (/** @type {any} */ err, /** @type {any} */ res) => {
          options.signal?.removeEventListener('abort', onAbort);
          if (err) reject(toKuiperError(err));
          else resolve(res);
        },
      );
      const onAbort = () => call.cancel();
      if (options.signal?.aborted) call.cancel();
      else options.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /**
   * @param {'generate' | 'chat'} method
   * @param {object} request
   * @param {CallOptions} options
   * @returns {AsyncGenerator<GenerateChunk, void, undefined>}
   * @private
   */
  async *_stream(method, request, options) {
    const call = this._inference[method](request, this._metadata(), this._callOptions(options));
    const onAbort = () => call.cancel();
    if (options.signal?.aborted) call.cancel();
    else options.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for await (const msg of call) yield toChunk(msg);
    } catch (err) {
      throw toKuiperError(err);
    } finally {
      options.signal?.removeEventListener('abort', onAbort);
      // The consumer may stop early: cancel so the server frees the sequence. The late
      // CANCELLED status must not become an unhandled 'error' event.
      call.on('error', () => {});
      call.cancel();
    }
  }
}

/**
 * New ids of one sequence for {@link DecodeStream#send} (kuiper.v1.SequenceIds).
 * @typedef {object} SequenceIds
 * @property {number | string | bigint} sequenceId caller-chosen key (uint64); a new key opens a sequence
 * @property {number[]} [ids] ids generated since this sequence's previous message
 * @property {number[]} [contextIds] only read when the sequence opens: ids before the streamed
 *   ones (usually the prompt), giving the first streamed ids their context (e.g. a leading space)
 * @property {boolean} [skipSpecialTokens] only read when the sequence opens
 * @property {boolean} [finished] last message of this sequence: flush held-back bytes, free it
 */

/**
 * Text one sequence gained (kuiper.v1.SequenceDelta); sequenceId as a decimal string.
 * @typedef {{sequenceId: string, text: string}} SequenceDelta
 */

/**
 * A DecodeStream call: each `send` writes one request and resolves with its response (the
 * server answers every request, in order). A text delta never ends inside a UTF-8 character;
 * the deltas of a sequence concatenate to `decode()` of all its ids. Errors (an id outside the
 * vocabulary, a deadline) reject the pending and every later `send` with a KuiperError.
 */
class DecodeStream {
  /** @param {any} call a grpc-js ClientDuplexStream @param {AbortSignal} [signal] */
  constructor(call, signal) {
    /** @private */
    this._call = call;
    /** @private @type {{resolve: (d: SequenceDelta[]) => void, reject: (e: Error) => void}[]} */
    this._pending = [];
    /** @private @type {Error | null} */
    this._error = null;
    /** @private @type {Set<string>} */
    this._open = new Set();
    call.on('data', (/** @type {any} */ msg) => this._pending.shift()?.resolve(msg.deltas));
    call.on('error', (/** @type {any} */ err) => this._fail(toKuiperError(err)));
    call.on('end', () => this._fail(new Error('the tokenizer service ended the DecodeStream')));
    /** @private */
    this._signal = signal;
    /** @private */
    this._onAbort = () => call.cancel();
    if (signal?.aborted) call.cancel();
    else signal?.addEventListener('abort', this._onAbort, { once: true });
  }

  /** @private @param {Error} err */
  _fail(err) {
    /** @private */
    this._error ??= err;
    for (const p of this._pending.splice(0)) p.reject(this._error);
    this._signal?.removeEventListener('abort', this._onAbort);
  }

  /**
   * Send the new ids of any number of sequences; resolves with one delta per sequence, in order.
   * @param {SequenceIds[]} sequences
   * @returns {Promise<SequenceDelta[]>}
   */
  send(sequences) {
    if (!Array.isArray(sequences)) throw new TypeError('send() takes an array of SequenceIds');
    const request = {
      sequences: sequences.map((s) => {
        checkInteger('sequenceId', s.sequenceId, INTEGER_RANGES.seed); // uint64
        return {
          sequenceId: String(s.sequenceId),
          ids: checkIds(s.ids ?? [], 'ids'),
          contextIds: checkIds(s.contextIds ?? [], 'contextIds'),
          skipSpecialTokens: !!s.skipSpecialTokens,
          finished: !!s.finished,
        };
      }),
    };
    if (this._error) return Promise.reject(this._error);
    return new Promise((resolve, reject) => {
      this._pending.push({ resolve, reject });
      this._call.write(request);
    });
  }

  /**
   * One sequence's next ids (→ its text delta). The first call for a sequence opens it with
   * `contextIds` and `skipSpecialTokens`; `finished` flushes and closes it.
   * @param {number[]} ids
   * @param {{sequenceId?: number | string | bigint, contextIds?: number[],
   *   skipSpecialTokens?: boolean, finished?: boolean}} [options] sequenceId defaults to 1
   * @returns {Promise<string>}
   */
  async push(ids, options = {}) {
    const key = String(options.sequenceId ?? 1);
    const opening = !this._open.has(key);
    const seq = {
      sequenceId: key,
      ids,
      contextIds: opening ? options.contextIds : undefined,
      skipSpecialTokens: opening ? options.skipSpecialTokens : undefined,
      finished: options.finished,
    };
    if (options.finished) this._open.delete(key);
    else this._open.add(key);
    const [delta] = await this.send([seq]);
    return delta.text;
  }

  /**
   * Close a sequence: flush bytes held back for an incomplete character (→ that text).
   * @param {{sequenceId?: number | string | bigint, ids?: number[]}} [options]
   * @returns {Promise<string>}
   */
  finish(options = {}) {
    return this.push(options.ids ?? [], { sequenceId: options.sequenceId, finished: true });
  }

  /** End the call (after the pending sends are answered). */
  async close() {
    if (this._error) return;
    const ended = new Promise((resolve) => {
      this._call.on('end', resolve);
      this._call.on('error', resolve);
    });
    this._call.end();
    await ended;
  }

  /** Cancel the call at once; pending and later sends reject with CANCELLED. */
  cancel() {
    this._call.cancel();
  }
}

/** @param {boolean | {rootCerts?: Buffer, privateKey?: Buffer, certChain?: Buffer}} tls */
function makeCredentials(tls) {
  if (!tls) return grpc.credentials.createInsecure();
  if (tls === true) return grpc.credentials.createSsl();
  return grpc.credentials.createSsl(tls.rootCerts ?? null, tls.privateKey ?? null, tls.certChain ?? null);
}

/**
 * @param {any} msg a kuiper.v1.GenerateResponse
 * @returns {GenerateChunk}
 */
function toChunk(msg) {
  const reason = msg.finishReason;
  return {
    tokenIds: msg.tokenIds,
    text: msg.text,
    logprobs: msg.logprobs,
    finishReason:
      reason && reason !== 'FINISH_REASON_UNSPECIFIED' ? reason.slice(FINISH_PREFIX.length) : null,
    usage: msg.usage ?? null,
  };
}

/**
 * Concatenate a stream of chunks into one result.
 * @param {AsyncIterable<GenerateChunk>} stream
 * @returns {Promise<GenerateResult>}
 */
async function collect(stream) {
  /** @type {GenerateResult} */
  const result = { tokenIds: [], text: '', finishReason: null, usage: null };
  for await (const chunk of stream) {
    result.tokenIds.push(...chunk.tokenIds);
    result.text += chunk.text;
    if (chunk.finishReason) result.finishReason = chunk.finishReason;
    if (chunk.usage) result.usage = chunk.usage;
  }
  return result;
}

/** Integer sampling fields and the range of their proto type (protobufjs would wrap -5). */
const INTEGER_RANGES = {
  maxNewTokens: [0n, 0xffffffffn],
  topK: [-(2n ** 31n), 2n ** 31n - 1n],
  seed: [0n, 2n ** 64n - 1n],
  logprobs: [0n, 0xffffffffn],
};

/**
 * Throw a RangeError naming the field when an integer field's value does not fit its proto
 * type (the server judges values that fit, e.g. a negative topK).
 * @param {string} key @param {any} value
 */
function checkSamplingRange(key, value) {
  if (key === 'stopTokenIds') {
    checkIds(value, 'stopTokenIds');
    return;
  }
  const range = INTEGER_RANGES[/** @type {keyof typeof INTEGER_RANGES} */ (key)];
  if (range) checkInteger(key, value, range);
}

/**
 * Throw a RangeError naming `name` unless `value` is an integer (number, bigint or decimal
 * string) in [lo, hi].
 * @param {string} name @param {any} value @param {bigint[]} range
 */
function checkInteger(name, value, [lo, hi]) {
  let n = null;
  try {
    if (typeof value === 'bigint' || Number.isInteger(value)) n = BigInt(value);
    else if (typeof value === 'string' && /^-?\d+$/.test(value.trim())) n = BigInt(value.trim());
  } catch {
    n = null;
  }
  if (n === null || n < lo || n > hi) {
    throw new RangeError(`${name} must be an integer in [${lo}, ${hi}], got ${value}`);
  }
}

/**
 * @param {unknown} ids
 * @param {string} what
 * @returns {number[]}
 */
function checkIds(ids, what) {
  if (!Array.isArray(ids) || ids.some((id) => !Number.isInteger(id) || id < 0 || id > 0xffffffff)) {
    throw new TypeError(`${what} must be an array of non-negative integer token ids`);
  }
  return ids;
}

/**
 * @param {unknown} messages
 * @returns {ChatMessage[]}
 */
function checkMessages(messages) {
  if (
    !Array.isArray(messages) ||
    messages.some((m) => !m || typeof m.role !== 'string' || typeof m.content !== 'string')
  ) {
    throw new TypeError('messages must be an array of {role: string, content: string}');
  }
  return messages.map((m) => ({ role: m.role, content: m.content }));
}

module.exports = { KuiperClient, DecodeStream, collect };
