"""Defaults shared by the server and the CLI (kept import-light for a fast `kuiper --help`)."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9092
DEFAULT_GRACE_S = 10.0
DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"
AUTH_TOKEN_ENV = "KUIPER_AUTH_TOKEN"
