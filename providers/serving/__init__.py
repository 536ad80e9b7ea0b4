"""OpenAI-compatible chat completions over local checkpoints (base models, full fine-tunes, PEFT adapters)."""
