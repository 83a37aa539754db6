#!/usr/bin/env bash
# Regenerate kuiperv1/*.pb.go from protos/kuiper/v1/*.proto (run after editing a .proto);
# with an argument, write them under that folder instead.
# Needs protoc, protoc-gen-go and protoc-gen-go-grpc on PATH (Debian: protobuf-compiler,
# protoc-gen-go, protoc-gen-go-grpc). A test compares the committed files with a fresh run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
protos="$here/../../protos"
module="github.com/kuiper-serve/kuiper-serve/clients/go"
protoc -I"$protos" \
  --go_out="$out" --go_opt=module="$module" \
  --go-grpc_out="$out" --go-grpc_opt=module="$module" \
  "$protos/kuiper/v1/tokenizer.proto" "$protos/kuiper/v1/inference.proto"
