"""Ollama Modelfiles: chat template to Go template, stop tokens, parameters, validation."""
