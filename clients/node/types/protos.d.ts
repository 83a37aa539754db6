/**
 * Load the kuiper.v1 and grpc.health.v1 packages (cached per proto dir).
 * @param {string} [protoDir]
 * @returns {{v1: any, health: any, definition: import('@grpc/proto-loader').PackageDefinition, protoDir: string}}
 */
export function loadProtos(protoDir?: string): {
    v1: any;
    health: any;
    definition: import("@grpc/proto-loader").PackageDefinition;
    protoDir: string;
};
/**
 * Where the .proto files live: an explicit dir, $KUIPER_PROTO_DIR, the repository's top-level
 * `protos/` folder (when the package sits in the kuiper-serve repo), or the copy `npm pack`
 * bundles into the package (`protos/` next to `src/`).
 * @param {string} [protoDir]
 * @returns {string}
 */
export function findProtoDir(protoDir?: string): string;
export const PROTO_FILES: string[];
