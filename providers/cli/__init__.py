"""`trl-post-training`: the command line for post-training jobs (typer + rich)."""
