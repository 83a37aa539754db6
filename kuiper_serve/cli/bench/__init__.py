"""`kuiper bench`, the load generator: `command` (flags, progress, output), `calls` (which
kuiper.v1 method, request data per call), `runner` (worker processes), `report` (ghz-shaped
report), `plot` (optional matplotlib chart)."""
