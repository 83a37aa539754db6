"""Defaults shared by both servers and the CLI: the one place for ports, addresses and the
environment variables.

The gRPC ports and addresses are kuiper_client.channel's, where clients find them without
this package; they are repeated here by name only, so servers and CLI import one module.
"""

import kuiper_client.channel as channel

INFERENCE_PORT = channel.INFERENCE_PORT  # 50051
TOKENIZER_PORT = channel.TOKENIZER_PORT  # 50052
INFERENCE_ADDRESS = channel.DEFAULT_ADDRESS  # localhost:50051
TOKENIZER_ADDRESS = channel.DEFAULT_TOKENIZER_ADDRESS  # localhost:50052

DEFAULT_HOST = "127.0.0.1"  # servers listen on this machine only unless told otherwise
INFERENCE_METRICS_PORT = 9091
TOKENIZER_METRICS_PORT = 9092
INFERENCE_GRACE_S = 30.0  # running streams may take a while to finish after SIGTERM
TOKENIZER_GRACE_S = 10.0
AUTH_TOKEN_ENV = "KUIPER_AUTH_TOKEN"
TOKENIZER_ADDRESS_ENV = "KUIPER_TOKENIZER_ADDRESS"
CPU_THREADS_ENV = "KUIPER_CPU_THREADS"  # CPU backend threads (`--threads`)
