"""inf_llm: training-free context memory (InfLLM) for long inputs on transformers models, and a chat server."""

__version__ = "0.1.0"
