"""`multitoken serve`: an OpenAI-compatible HTTP server over a continuous-batching decode engine."""
