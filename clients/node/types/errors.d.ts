export class KuiperError extends Error {
    /**
     * @param {number} code gRPC status code (see `grpc.status`)
     * @param {string} details the server's message
     * @param {import('@grpc/grpc-js').Metadata} [metadata] trailing metadata
     */
    constructor(code: number, details: string, metadata?: import("@grpc/grpc-js").Metadata);
    /** gRPC status code, e.g. 3 */
    code: number;
    /** gRPC status name, e.g. "INVALID_ARGUMENT" */
    codeName: string;
    /** the server's message, without the code prefix */
    details: string;
    metadata: import("@grpc/grpc-js").Metadata | undefined;
}
/**
 * Turn a grpc-js ServiceError (or anything thrown) into a KuiperError.
 * @param {any} err
 * @returns {Error}
 */
export function toKuiperError(err: any): Error;
/** @type {Record<number, string>} */
export const CODE_NAMES: Record<number, string>;
import { status } from "@grpc/grpc-js";
export { status };
