"""What both services share: server-side auth and TLS, health and reflection, defaults and
ports, model source resolution and the GGUF reader. Depends on kuiper_client (for the channel
opener and the well-known ports) and never on a service or the CLI."""
