"""OpenAI-compatible HTTP server for checkpoints and Hugging Face causal LMs."""
