"""The engine in its own process: `process` (the child: model, backend, step loop), `client`
(the gRPC frontend's handle on it), `protocol` (the messages between them), `build` (the
engine a server runs, built the same way in either mode)."""
