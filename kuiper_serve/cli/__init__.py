"""The `kuiper` command: one module per command group, registered in kuiper_serve.cli.main.
Sits on top of everything; nothing imports it."""
