"""The package version, in a module of its own so that any module can record it without importing
the package's public API (hsae/__init__.py imports the model registry)."""

__version__ = "0.1.0"
