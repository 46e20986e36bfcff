"""Serving loaded models: one base in memory with many named adapters (registry.py), concurrent
requests decoded together step by step (batching.py), text streamed as it is decoded (text.py),
the OpenAI-compatible HTTP API (requests.py, api.py, server.py) and the terminal chat (chat.py)."""
