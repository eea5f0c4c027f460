"""`lmlab serve`: `backends` (the Backend protocol, the transformers backend, loading), `gguf_backend` (llama.cpp),
`app` (the OpenAI-compatible HTTP app and running it)."""
