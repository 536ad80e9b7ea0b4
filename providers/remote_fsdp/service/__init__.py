"""The FSDP training service's core: the app and its CLI (app.py), the post-training, dataset and node
routes (routes.py), jobs, nodes, security, configuration; launchers live in providers/launchers. Add-ons
(providers/pipelines, providers/workflows, providers/operator_tools) mount themselves on it through
`core.ServiceCore`. Job records live in the shared `providers.jobs.store.JobStore`."""
