"""The Chroma engine and its pipecat service.

    from processors.chroma import ChromaS2SService, ChromaSettings

Names are loaded on first use, so importing a small part (`processors.chroma.config`) stays light."""

_EXPORTS = {
    "ChromaS2SService": "service",
    "ChromaSettings": "settings",
    "open_session": "settings",
    "shared_model": "settings",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
