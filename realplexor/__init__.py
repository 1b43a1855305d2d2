"""Realplexor: a Comet (server push) server, compatible with Dklab Realplexor."""

__version__ = "0.1.0"
