"""Command-line interface (a thin layer over the server and management model)."""

from .main import main

__all__ = ["main"]
