"""The Typer application: parse options, call the library, render, exit."""

from .root import app, main

__all__ = ["app", "main"]
