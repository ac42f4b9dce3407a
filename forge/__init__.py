"""Forge: a base LLM and a dataset to a fine-tuned model running in Ollama, in one command."""

__version__ = "0.1.0"
