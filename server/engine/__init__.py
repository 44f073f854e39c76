"""The engine: one thread owns the model, the adapter registry, the KV cache and the scheduler.

Nothing here imports `server.http`; the HTTP side talks to the engine only through `AsyncEngine`'s
commands. Kept import-free so that reading `EngineConfig` does not load torch.
"""
