"""The package version, kept apart so that every layer can read it without importing the package."""

__version__ = "0.2.0"
