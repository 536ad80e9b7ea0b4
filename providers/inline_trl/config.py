"""Configuration of the inline::trl provider (the `config:` block in run.yaml)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PositiveInt


class TrlPostTrainingConfig(BaseModel):
    # Run directories (spec, data, status, logs, checkpoints) and the SQLite job store live here.
    data_dir: str = "~/.llama/trl_post_training"
    # Jobs beyond this wait as `scheduled`; one at a time suits a single device.
    max_concurrent_jobs: PositiveInt = 1
    # Precision used when a request gives no dtype ("bf16" on a CPU without bf16 kernels falls back to fp32).
    dtype: str = "fp32"
    logging_steps: PositiveInt = 1
    # Where checkpoint_dir may point besides DATA_DIR/checkpoints (where relative ones land); null: anywhere.
    allowed_checkpoint_roots: list[str] | None = None
    # Where model directories may lie (the Hugging Face cache is always allowed); null: anywhere.
    allowed_model_roots: list[str] | None = None
    # Jobs waiting beyond this are refused (400) until some have run.
    max_queued_jobs: PositiveInt = 100
    # Threads per training process (torch.set_num_threads); null leaves torch's default.
    num_threads: PositiveInt | None = Field(default=None)
    # The stack's inference provider that answers with this package's checkpoints (run_serve.yaml's
    # inline::trl_serving): each completed job's final checkpoint is registered there as a model of the stack,
    # under the identifier its artifacts give. None (or a stack without inference): nothing is registered.
    serve_provider_id: str | None = None

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "~/.llama/distributions/trl", **kwargs: Any) -> dict[str, Any]:
        return {"data_dir": "${env.TRL_POST_TRAINING_DIR:" + __distro_dir__ + "/trl_post_training}", "dtype": "fp32"}
