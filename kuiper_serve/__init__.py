"""kuiper-serve's own packages: `common` (what both services share) and `cli` (the `kuiper`
command). Imports nothing, so that `import kuiper_serve.common.defaults` stays cheap."""
