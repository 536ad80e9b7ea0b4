"""The FSDP training service: FastAPI routes (routes.py), torchrun launcher (launcher.py), configuration
(config.py), app and CLI (app.py). Job records live in the shared `providers.jobs.store.JobStore`."""
