export type KuiperClientOptions = {
    /**
     * host:port of the inference service (default localhost:50051)
     */
    inferenceAddress?: string | undefined;
    /**
     * host:port of the tokenizer service (default localhost:50052)
     */
    tokenizerAddress?: string | undefined;
    /**
     * deadline of every call, a whole stream included (default 60000; 0 = none)
     */
    deadlineMs?: number | undefined;
    /**
     * folder holding kuiper/v1/*.proto (default: $KUIPER_PROTO_DIR, the
     * package's own protos/ copy, or the repository's protos/ folder)
     */
    protoDir?: string | undefined;
    /**
     * use TLS
     * (true: system roots; an object: custom roots and optional client certificate)
     */
    tls?: boolean | {
        rootCerts?: Buffer;
        privateKey?: Buffer;
        certChain?: Buffer;
    } | undefined;
    /**
     * bearer token, sent as `authorization: Bearer <token>`
     */
    token?: string | undefined;
    /**
     * extra grpc-js channel options
     */
    channelOptions?: Record<string, any> | undefined;
};
/**
 * Sampling parameters (kuiper.v1.SamplingParams, camelCase). Omitted fields take the server's
 * defaults: temperature 1.0, top_p 1.0, repetition_penalty 1.0, random seed.
 */
export type SamplingParams = {
    /**
     * 0 = server default (256), capped by the context length
     */
    maxNewTokens?: number | undefined;
    /**
     * 0 = greedy
     */
    temperature?: number | undefined;
    /**
     * 0 disables
     */
    topK?: number | undefined;
    /**
     * in (0, 1]
     */
    topP?: number | undefined;
    /**
     * in [0, 1]
     */
    minP?: number | undefined;
    repetitionPenalty?: number | undefined;
    /**
     * uint64
     */
    seed?: string | number | bigint | undefined;
    /**
     * stop strings (not included in the returned text)
     */
    stop?: string[] | undefined;
    stopTokenIds?: number[] | undefined;
    ignoreEos?: boolean | undefined;
    /**
     * also return this many top alternatives per token
     */
    logprobs?: number | undefined;
};
export type CallOptions = {
    /**
     * overrides the client's deadline for this call
     */
    deadlineMs?: number | undefined;
    /**
     * aborting cancels the call (the stream ends with CANCELLED)
     */
    signal?: AbortSignal | undefined;
};
export type GenerateOptions = {
    deadlineMs?: number | undefined;
    signal?: AbortSignal | undefined;
    /**
     * echoed in server logs and metrics
     */
    requestId?: string | undefined;
    /**
     * text prompts: add BOS as the tokenizer does (default true)
     */
    addSpecialTokens?: boolean | undefined;
};
export type Usage = {
    promptTokens: number;
    completionTokens: number;
    timeToFirstTokenS: number;
    queueTimeS: number;
    cachedPromptTokens: number;
};
export type TokenLogprob = {
    tokenId: number;
    logprob: number;
    top: {
        tokenId: number;
        logprob: number;
    }[];
};
/**
 * One streamed message of Generate/Chat.
 */
export type GenerateChunk = {
    /**
     * ids generated since the previous chunk
     */
    tokenIds: number[];
    /**
     * text generated since the previous chunk (may be "")
     */
    text: string;
    /**
     * one per id, when logprobs was requested
     */
    logprobs: TokenLogprob[];
    /**
     * set on the last chunk only
     */
    finishReason: "LENGTH" | "STOP" | "EOS" | "CANCELLED" | null;
    /**
     * set on the last chunk only
     */
    usage: Usage | null;
};
export type GenerateResult = {
    tokenIds: number[];
    text: string;
    finishReason: "LENGTH" | "STOP" | "EOS" | "CANCELLED" | null;
    usage: Usage | null;
};
export type ChatMessage = {
    role: string;
    content: string;
};
export type TokenizerInfo = {
    vocabSize: number;
    bosId: number | null;
    eosId: number | null;
    padId: number | null;
    specialTokens: {
        id: number;
        content: string;
    }[];
    hasChatTemplate: boolean;
    /**
     * "hf-tokenizers", "sentencepiece" or "gguf"
     */
    backend: string;
    source: string;
    /**
     * every id that ends generation
     */
    stopIds: number[];
};
export type ModelInfo = {
    model: string;
    architecture: string;
    vocabSize: number;
    contextLength: number;
    numLayers: number;
    hiddenSize: number;
    numHeads: number;
    numKvHeads: number;
    dtype: string;
    device: string;
    kvBlockSize: number;
    kvBlocksTotal: number;
    maxBatchSize: number;
};
/**
 * New ids of one sequence for {@link DecodeStream#send} (kuiper.v1.SequenceIds).
 */
export type SequenceIds = {
    /**
     * caller-chosen key (uint64); a new key opens a sequence
     */
    sequenceId: number | string | bigint;
    /**
     * ids generated since this sequence's previous message
     */
    ids?: number[] | undefined;
    /**
     * only read when the sequence opens: ids before the streamed
     * ones (usually the prompt), giving the first streamed ids their context (e.g. a leading space)
     */
    contextIds?: number[] | undefined;
    /**
     * only read when the sequence opens
     */
    skipSpecialTokens?: boolean | undefined;
    /**
     * last message of this sequence: flush held-back bytes, free it
     */
    finished?: boolean | undefined;
};
/**
 * Text one sequence gained (kuiper.v1.SequenceDelta); sequenceId as a decimal string.
 */
export type SequenceDelta = {
    sequenceId: string;
    text: string;
};
export class KuiperClient {
    /** @param {KuiperClientOptions} [options] */
    constructor(options?: KuiperClientOptions);
    inferenceAddress: string;
    tokenizerAddress: string;
    deadlineMs: number;
    /** @private */
    private _token;
    /** @private */
    private _samplingFields;
    /** @private */
    private _inference;
    /** @private */
    private _tokenizer;
    /** @private */
    private _health;
    /**
     * Stream a continuation of a prompt (text, or token ids). Breaking out of the loop cancels
     * the request on the server.
     * @param {string | number[]} prompt
     * @param {SamplingParams} [sampling]
     * @param {GenerateOptions} [options]
     * @returns {AsyncGenerator<GenerateChunk, void, undefined>}
     */
    generate(prompt: string | number[], sampling?: SamplingParams, options?: GenerateOptions): AsyncGenerator<GenerateChunk, void, undefined>;
    /**
     * Render messages with the model's chat template, then stream the answer.
     * @param {ChatMessage[]} messages
     * @param {SamplingParams} [sampling]
     * @param {GenerateOptions} [options]
     * @returns {AsyncGenerator<GenerateChunk, void, undefined>}
     */
    chat(messages: ChatMessage[], sampling?: SamplingParams, options?: GenerateOptions): AsyncGenerator<GenerateChunk, void, undefined>;
    /**
     * Generate and collect the whole answer.
     * @param {string | number[]} prompt
     * @param {SamplingParams} [sampling]
     * @param {GenerateOptions} [options]
     * @returns {Promise<GenerateResult>}
     */
    generateText(prompt: string | number[], sampling?: SamplingParams, options?: GenerateOptions): Promise<GenerateResult>;
    /**
     * @param {CallOptions} [options]
     * @returns {Promise<ModelInfo>}
     */
    modelInfo(options?: CallOptions): Promise<ModelInfo>;
    /**
     * Encode one text (→ ids) or a batch of texts (→ one id list per text).
     * @overload
     * @param {string} texts
     * @param {{addSpecialTokens?: boolean} & CallOptions} [options]
     * @returns {Promise<number[]>}
     */
    encode(texts: string, options?: ({
        addSpecialTokens?: boolean;
    } & CallOptions) | undefined): Promise<number[]>;
    /**
     * @overload
     * @param {string[]} texts
     * @param {{addSpecialTokens?: boolean} & CallOptions} [options]
     * @returns {Promise<number[][]>}
     */
    encode(texts: string[], options?: ({
        addSpecialTokens?: boolean;
    } & CallOptions) | undefined): Promise<number[][]>;
    /**
     * Decode one id sequence (→ text) or a batch of sequences (→ one text each).
     * @overload
     * @param {number[]} ids
     * @param {{skipSpecialTokens?: boolean} & CallOptions} [options]
     * @returns {Promise<string>}
     */
    decode(ids: number[], options?: ({
        skipSpecialTokens?: boolean;
    } & CallOptions) | undefined): Promise<string>;
    /**
     * @overload
     * @param {number[][]} ids
     * @param {{skipSpecialTokens?: boolean} & CallOptions} [options]
     * @returns {Promise<string[]>}
     */
    decode(ids: number[][], options?: ({
        skipSpecialTokens?: boolean;
    } & CallOptions) | undefined): Promise<string[]>;
    /**
     * Open a DecodeStream: incremental detokenization of one or many sequences over one
     * bidirectional call (what a server streaming tokens does). See {@link DecodeStream}.
     * @param {CallOptions} [options] the deadline covers the whole stream
     * @returns {DecodeStream}
     */
    decodeStream(options?: CallOptions): DecodeStream;
    /**
     * Render chat messages with the model's template (without generating).
     * @param {ChatMessage[]} messages
     * @param {{addGenerationPrompt?: boolean} & CallOptions} [options]
     * @returns {Promise<{text: string, ids: number[]}>}
     */
    applyChatTemplate(messages: ChatMessage[], options?: {
        addGenerationPrompt?: boolean;
    } & CallOptions): Promise<{
        text: string;
        ids: number[];
    }>;
    /**
     * @param {CallOptions} [options]
     * @returns {Promise<TokenizerInfo>}
     */
    tokenizerInfo(options?: CallOptions): Promise<TokenizerInfo>;
    /**
     * grpc.health.v1 status of one server: "SERVING", "NOT_SERVING", ...
     * @param {'inference' | 'tokenizer'} server
     * @param {{service?: string} & CallOptions} [options] service name ('' = the whole server)
     * @returns {Promise<string>}
     */
    health(server: "inference" | "tokenizer", options?: {
        service?: string;
    } & CallOptions): Promise<string>;
    /**
     * Poll health until every named server answers SERVING.
     * @param {{servers?: ('inference' | 'tokenizer')[], timeoutMs?: number, intervalMs?: number,
     *   signal?: AbortSignal}} [options] aborting the signal stops the wait
     * @returns {Promise<void>}
     */
    waitUntilServing(options?: {
        servers?: ("inference" | "tokenizer")[];
        timeoutMs?: number;
        intervalMs?: number;
        signal?: AbortSignal;
    }): Promise<void>;
    /** Close every channel. Calls in flight are cancelled. */
    close(): void;
    /** @private @param {SamplingParams} sampling */
    private _sampling;
    /** @private */
    private _metadata;
    /** @private @param {CallOptions} options */
    private _callOptions;
    /**
     * @param {any} client
     * @param {string} method
     * @param {object} request
     * @param {CallOptions} options
     * @returns {Promise<any>}
     * @private
     */
    private _unary;
    /**
     * @param {'generate' | 'chat'} method
     * @param {object} request
     * @param {CallOptions} options
     * @returns {AsyncGenerator<GenerateChunk, void, undefined>}
     * @private
     */
    private _stream;
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
export class DecodeStream {
    /** @param {any} call a grpc-js ClientDuplexStream @param {AbortSignal} [signal] */
    constructor(call: any, signal?: AbortSignal);
    /** @private */
    private _call;
    /** @private @type {{resolve: (d: SequenceDelta[]) => void, reject: (e: Error) => void}[]} */
    private _pending;
    /** @private @type {Error | null} */
    private _error;
    /** @private @type {Set<string>} */
    private _open;
    /** @private */
    private _signal;
    /** @private */
    private _onAbort;
    /** @private @param {Error} err */
    private _fail;
    /**
     * Send the new ids of any number of sequences; resolves with one delta per sequence, in order.
     * @param {SequenceIds[]} sequences
     * @returns {Promise<SequenceDelta[]>}
     */
    send(sequences: SequenceIds[]): Promise<SequenceDelta[]>;
    /**
     * One sequence's next ids (→ its text delta). The first call for a sequence opens it with
     * `contextIds` and `skipSpecialTokens`; `finished` flushes and closes it.
     * @param {number[]} ids
     * @param {{sequenceId?: number | string | bigint, contextIds?: number[],
     *   skipSpecialTokens?: boolean, finished?: boolean}} [options] sequenceId defaults to 1
     * @returns {Promise<string>}
     */
    push(ids: number[], options?: {
        sequenceId?: number | string | bigint;
        contextIds?: number[];
        skipSpecialTokens?: boolean;
        finished?: boolean;
    }): Promise<string>;
    /**
     * Close a sequence: flush bytes held back for an incomplete character (→ that text).
     * @param {{sequenceId?: number | string | bigint, ids?: number[]}} [options]
     * @returns {Promise<string>}
     */
    finish(options?: {
        sequenceId?: number | string | bigint;
        ids?: number[];
    }): Promise<string>;
    /** End the call (after the pending sends are answered). */
    close(): Promise<void>;
    /** Cancel the call at once; pending and later sends reject with CANCELLED. */
    cancel(): void;
}
/**
 * Concatenate a stream of chunks into one result.
 * @param {AsyncIterable<GenerateChunk>} stream
 * @returns {Promise<GenerateResult>}
 */
export function collect(stream: AsyncIterable<GenerateChunk>): Promise<GenerateResult>;
