"""Ship a trained model: merged full model, GGUF (llama.cpp / Ollama) with a Modelfile, Hugging Face Hub."""

from .exporter import export_model
from .gguf_export import export_gguf
from .hub import push_to_hub

__all__ = ["export_gguf", "export_model", "push_to_hub"]
