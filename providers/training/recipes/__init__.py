"""One file per training method. Each exposes `train(spec, files) -> dict` (a summary for status.json)."""
