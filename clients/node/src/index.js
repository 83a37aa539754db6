'use strict';
// @kuiper/client: Node.js client for kuiper-serve (inference + tokenizer services over gRPC).

const { KuiperClient, collect } = require('./client');
const { KuiperError, status } = require('./errors');
const { loadProtos, findProtoDir } = require('./protos');

module.exports = { KuiperClient, KuiperError, collect, status, loadProtos, findProtoDir };
