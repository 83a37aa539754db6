"""The CUDA backend, split by concern (backend.py describes the parts). Importing this package
needs neither a GPU nor PyCUDA; CudaBackend() does."""
