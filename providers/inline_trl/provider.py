"""The inline::trl provider: Llama Stack's six post-training methods over the shared JobManager.

Every parameter is annotated and named as in the 0.2.12 protocol: the server builds the HTTP routes
(and validates request bodies) from these signatures.
"""


import asyncio
import sys
from pathlib import Path
from typing import Any

from llama_stack.apis.post_training import (
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
)

from ..errors import BadRequest
from ..jobs.manager import JobManager, QueueFullError
from ..jobs.store import JobStore, UnknownJobError
from ..api.paths import ProviderDefaults, check_job_uuid
from ..api.requests import PreferenceAlgorithmConfig, SFTAlgorithmConfig, TrainingConfig
from ..api.to_spec import data_config_of, fetch_rows, method_of, preference_target, prepare_job
from ..training.methods import PREFERENCE_CALL, SFT_CALL
from ..training.run_files import RunFiles
from ..stack_models import StackModels
from ..versions import warn_untested_versions
from ..training.spec import JobSpec
from .config import TrlPostTrainingConfig


def training_command(spec: JobSpec, files: RunFiles) -> list[str]:
    return [sys.executable, "-m", "providers.training.run", str(files.dir)]


class TrlPostTrainingImpl:
    def __init__(self, config: TrlPostTrainingConfig, datasetio: Any, datasets: Any = None, models: Any = None) -> None:
        warn_untested_versions()
        self.config = config
        self.datasetio = datasetio
        self.stack_models = StackModels(models, config.serve_provider_id)  # completed jobs join the stack's models
        self.data_dir = Path(config.data_dir).expanduser().resolve()
        self.defaults = ProviderDefaults(
            data_dir=str(self.data_dir),
            dtype=config.dtype,
            logging_steps=config.logging_steps,
            allowed_checkpoint_roots=config.allowed_checkpoint_roots,
            allowed_model_roots=config.allowed_model_roots,
        )
        env = {"OMP_NUM_THREADS": str(config.num_threads)} if config.num_threads else {}
        self.jobs = JobManager(JobStore(self.data_dir / "jobs.db"), training_command, config.max_concurrent_jobs, env,
                               runs_dir=self.data_dir / "runs", max_queued_jobs=config.max_queued_jobs)

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.jobs.shutdown()

    async def _submit(self, job_uuid: str, method: str, model: str, training_config: TrainingConfig,
                      algorithm_config: Any, logger_config: dict[str, Any], checkpoint_dir: str | None,
                      result_name: str | None = None) -> PostTrainingJob:
        check_job_uuid(job_uuid)  # before anything touches data_dir/runs/<job_uuid>
        if self.jobs.store.exists(job_uuid):
            raise BadRequest(f"job_uuid: a job named {job_uuid!r} already exists")
        if training_config.fsdp_config or training_config.torch_run_config:
            raise BadRequest("training_config.fsdp_config/torch_run_config: only remote::trl_fsdp runs FSDP jobs")
        dc = data_config_of(training_config)
        train_rows = await fetch_rows(self.datasetio, dc.dataset_id, "training_config.data_config.dataset_id")
        val_rows = None
        if dc.validation_dataset_id:
            val_rows = await fetch_rows(self.datasetio, dc.validation_dataset_id,
                                        "training_config.data_config.validation_dataset_id")

        def submit() -> None:  # file and model checks: off the server's event loop
            with self.jobs.reserve(job_uuid) as run_dir:
                spec = prepare_job(
                    job_uuid=job_uuid, run_dir=run_dir, method=method, model=model, training_config=training_config,
                    algorithm_config=algorithm_config, logger_config=logger_config, checkpoint_dir=checkpoint_dir,
                    defaults=self.defaults, train_rows=train_rows, validation_rows=val_rows, result_name=result_name,
                )
                self.jobs.submit(spec, resources={"method": method, "model": spec.model})

        try:
            await asyncio.to_thread(submit)
        except QueueFullError as e:
            raise BadRequest(str(e)) from None
        return PostTrainingJob(job_uuid=job_uuid)

    async def supervised_fine_tune(
        self,
        job_uuid: str,
        training_config: TrainingConfig,
        hyperparam_search_config: dict[str, Any],
        logger_config: dict[str, Any],
        model: str | None = None,
        checkpoint_dir: str | None = None,
        algorithm_config: SFTAlgorithmConfig | None = None,
    ) -> PostTrainingJob:
        if not model:
            raise BadRequest("model: required (a local model directory or a Hugging Face model id)")
        return await self._submit(job_uuid, method_of(SFT_CALL, algorithm_config), model, training_config, algorithm_config,
                                  logger_config, checkpoint_dir)

    async def preference_optimize(
        self,
        job_uuid: str,
        finetuned_model: str,
        algorithm_config: PreferenceAlgorithmConfig,
        training_config: TrainingConfig,
        hyperparam_search_config: dict[str, Any],
        logger_config: dict[str, Any],
        model: str | None = None,
        checkpoint_dir: str | None = None,
    ) -> PostTrainingJob:
        """0.2.12's preference_optimize; `model` and `checkpoint_dir` are extensions (with `model`,
        `finetuned_model` names the result: see `preference_target`)."""
        target, result_name = preference_target(finetuned_model, model)
        return await self._submit(job_uuid, method_of(PREFERENCE_CALL, algorithm_config), target, training_config, algorithm_config,
                                  logger_config, checkpoint_dir, result_name)

    async def get_training_jobs(self) -> ListPostTrainingJobsResponse:
        return ListPostTrainingJobsResponse(data=[PostTrainingJob(job_uuid=j.job_uuid) for j in self.jobs.store.list()])

    def _view(self, job_uuid: str) -> dict[str, Any]:
        try:
            return self.jobs.job_view(job_uuid)
        except UnknownJobError as e:
            raise BadRequest(f"job_uuid: {e}") from None

    async def _seen(self, job_uuid: str) -> dict[str, Any]:
        """The job's view; a completed job's final checkpoint is made a model of the stack (its local path is
        what serve_provider_id loads)."""
        view = self._view(job_uuid)
        checkpoints = view["checkpoints"]
        if view["status"] == "completed" and checkpoints:
            await self.stack_models.register_final(job_uuid, checkpoints, checkpoints[-1]["path"])
        return view

    async def get_training_job_status(self, job_uuid: str) -> PostTrainingJobStatusResponse:
        return PostTrainingJobStatusResponse(**await self._seen(job_uuid))

    async def cancel_training_job(self, job_uuid: str) -> None:
        self._view(job_uuid)
        await asyncio.to_thread(self.jobs.cancel, job_uuid)

    async def get_training_job_artifacts(self, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        view = await self._seen(job_uuid)
        return PostTrainingJobArtifactsResponse(job_uuid=job_uuid, checkpoints=view["checkpoints"])
