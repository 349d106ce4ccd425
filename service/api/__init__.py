"""The HTTP service: FastAPI app, cross-request batching, metrics, auth and limits."""
