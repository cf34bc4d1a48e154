"""Bridges to other tools (Polygraphy). Each module imports only what it needs, when called."""
