"""The ``nzrt`` command-line app (``nzrt = "nzrt.cli:main"``): argument parsing and the commands'
own work (profile, inspect, evaluate, generate, env), kept apart from the library. The library never
imports this package; it imports the library."""
from .commands import app, main

__all__ = ["app", "main"]
