#!/usr/bin/env bash
# Build the example to clients/go/bin/kuiper-example (or to $1).
#
# Offline with Debian's packages (golang-go golang-google-grpc-dev golang-google-protobuf-dev
# golang-github-golang-protobuf-1-5-dev): GOPATH mode over /usr/share/gocode, no module
# download. Elsewhere: module mode (`go mod tidy` fetches grpc and protobuf through your proxy).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/bin/kuiper-example}"
module="github.com/kuiper-serve/kuiper-serve/clients/go"
gocode=/usr/share/gocode
if [ -d "$gocode/src/google.golang.org/grpc" ] && [ -d "$gocode/src/google.golang.org/protobuf" ]; then
  # grpc marshals through github.com/golang/protobuf; v1.3 of it panics on generated APIv2
  # messages ("protobuf tag not enough fields"), v1.4+ (registry.go) bridges to them.
  if [ ! -f "$gocode/src/github.com/golang/protobuf/proto/registry.go" ]; then
    echo "build.sh: install golang-github-golang-protobuf-1-5-dev (v1.3 is installed)" >&2
    exit 1
  fi
  gopath="$(mktemp -d)"
  trap 'rm -rf "$gopath"' EXIT
  mkdir -p "$gopath/src/$(dirname "$module")"
  ln -s "$here" "$gopath/src/$module"
  GO111MODULE=off GOPATH="$gopath:$gocode" \
    go build -o "$out" "$module/cmd/kuiper-example"
else
  (cd "$here" && go mod tidy && go build -o "$out" ./cmd/kuiper-example)
fi
echo "built $out"
