"""The HTTP side: FastAPI app, OpenAI-compatible routes, adapter uploads, metrics, settings, CLI."""
