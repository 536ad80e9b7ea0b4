"""Ship a trained model: merged full model, GGUF (llama.cpp / Ollama) with a Modelfile, Hugging Face Hub."""

from .exporter import export_model
from .hub import push_to_hub

# gguf_export (numpy, torch) is imported by export_model when it writes a GGUF file
__all__ = ["export_model", "push_to_hub"]
