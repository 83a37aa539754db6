'use strict';
// @kuiper/client: Node.js client for kuiper-serve (inference + tokenizer services over gRPC).

// The public types, re-exported for TypeScript (`import type { GenerateChunk } from ...`).
/** @typedef {import('./client').KuiperClientOptions} KuiperClientOptions */
/** @typedef {import('./client').SamplingParams} SamplingParams */
/** @typedef {import('./client').CallOptions} CallOptions */
/** @typedef {import('./client').GenerateOptions} GenerateOptions */
/** @typedef {import('./client').Usage} Usage */
/** @typedef {import('./client').TokenLogprob} TokenLogprob */
/** @typedef {import('./client').GenerateChunk} GenerateChunk */
/** @typedef {import('./client').GenerateResult} GenerateResult */
/** @typedef {import('./client').ChatMessage} ChatMessage */
/** @typedef {import('./client').TokenizerInfo} TokenizerInfo */
/** @typedef {import('./client').ModelInfo} ModelInfo */
/** @typedef {import('./client').SequenceIds} SequenceIds */
/** @typedef {import('./client').SequenceDelta} SequenceDelta */

const { KuiperClient, DecodeStream, collect } = require('./client');
const { KuiperError, status } = require('./errors');
const { loadProtos, findProtoDir } = require('./protos');

module.exports = {
  KuiperClient,
  DecodeStream,
  KuiperError,
  collect,
  status,
  loadProtos,
  findProtoDir,
};
