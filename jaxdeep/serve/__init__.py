"""Serving: inference engine with continuous batching, OpenAI-compatible HTTP server, metrics, load benchmark."""
