"""The training core: the job spec, data, one recipe per method, FSDP, and the entry point. No HTTP, no Llama Stack."""
