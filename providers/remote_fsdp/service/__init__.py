"""The FSDP training service: FastAPI routes (routes.py), jobs (jobs.py), configuration (config.py), app and
CLI (app.py). Launchers live in providers/launchers; job records in the shared `providers.jobs.store.JobStore`."""
