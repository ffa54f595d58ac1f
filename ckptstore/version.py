"""The package version, importable without importing the package (the DCP writer records it)."""

__version__ = "0.1.0"
