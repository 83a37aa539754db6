'use strict';
// gRPC failures surface as KuiperError: an Error carrying the numeric status code, its
// name (e.g. "INVALID_ARGUMENT") and the server's message.

const { status } = require('@grpc/grpc-js');

/** @type {Record<number, string>} */
const CODE_NAMES = Object.fromEntries(Object.entries(status).map(([name, code]) => [code, name]));

class KuiperError extends Error {
  /**
   * @param {number} code gRPC status code (see `grpc.status`)
   * @param {string} details the server's message
   * @param {import('@grpc/grpc-js').Metadata} [metadata] trailing metadata
   */
  constructor(code, details, metadata) {
    const codeName = CODE_NAMES[code] || `CODE_${code}`;
    super(`${codeName}: ${details}`);
    this.name = 'KuiperError';
    /** gRPC status code, e.g. 3 */
    this.code = code;
    /** gRPC status name, e.g. "INVALID_ARGUMENT" */
    this.codeName = codeName;
    /** the server's message, without the code prefix */
    this.details = details;
    this.metadata = metadata;
  }
}

/**
 * Turn a grpc-js ServiceError (or anything thrown) into a KuiperError.
 * @param {any} err
 * @returns {Error}
 */
function toKuiperError(err) {
  if (err instanceof KuiperError) return err;
  if (err && typeof err.code === 'number' && CODE_NAMES[err.code] !== undefined) {
    return new KuiperError(err.code, err.details ?? err.message ?? '', err.metadata);
  }
  return err;
}

module.exports = { KuiperError, toKuiperError, CODE_NAMES, status };
