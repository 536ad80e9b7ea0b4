"""The remote::trl_fsdp adapter: Llama Stack's post-training API forwarded to the FSDP training service.

Rows come from the stack's datasetio and go to the service in chunks; everything else is a plain
HTTP call. A 4xx from the service becomes a ValueError, which Llama Stack answers with 400.
Annotations are real types (no postponed evaluation): the 0.2.12 server builds routes from them.
"""

import asyncio
import json
from typing import Any

import httpx
from pydantic import BaseModel
from llama_stack.apis.post_training import (
    ListPostTrainingJobsResponse,
    PostTrainingJob,
    PostTrainingJobArtifactsResponse,
    PostTrainingJobStatusResponse,
)

from ..errors import BadRequest
from ..stack_models import StackModels
from ..api.requests import PreferenceAlgorithmConfig, SFTAlgorithmConfig, TrainingConfig
from ..api.to_spec import data_config_of, fetch_rows
from .config import TrlFsdpAdapterConfig



def sent_fields(config: BaseModel) -> dict[str, Any]:
    """The fields of an algorithm_config its caller set, and its type: a default written out here would count as
    given at the service (DPO's `beta` default would win over the 0.2.12 client's `reward_scale`)."""
    return {"type": config.type, **config.model_dump(mode="json", exclude_unset=True)}

class TrlFsdpAdapter:
    def __init__(self, config: TrlFsdpAdapterConfig, datasetio: Any, models: Any = None) -> None:
        self.config = config
        self.datasetio = datasetio
        self.stack_models = StackModels(models, config.serve_provider_id)  # completed jobs join the stack's models
        headers = {"authorization": f"Bearer {config.api_token}"} if config.api_token else {}
        self.http = httpx.AsyncClient(base_url=config.url, timeout=config.timeout_s, headers=headers)

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        await self.http.aclose()

    async def _call(self, method: str, path: str, idempotent: bool = True, **kw) -> Any:
        attempts = 1 + (self.config.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                r = await self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                if attempt + 1 == attempts:
                    # TimeoutError: Llama Stack answers 504 with this message (any other type is a bare 500).
                    raise TimeoutError(f"training service at {self.config.url} unreachable: {e}") from None
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if r.status_code >= 500 and attempt + 1 < attempts:
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if 400 <= r.status_code < 500:
                detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
                detail = detail if isinstance(detail, str) else json.dumps(detail)
                if r.status_code in (401, 403):
                    raise PermissionError(f"training service at {self.config.url}: {detail}")
                raise BadRequest(detail)
            if r.status_code >= 500:
                raise TimeoutError(f"training service at {self.config.url} answered {r.status_code}: {r.text[:300]}")
            return r.json() if r.content else None

    async def _upload(self, dataset_id: str, field: str) -> None:
        rows = await fetch_rows(self.datasetio, dataset_id, field)
        n = self.config.upload_chunk_rows
        for i in range(0, len(rows), n):
            body = "".join(json.dumps(row, default=str) + "\n" for row in rows[i : i + n])
            await self._call("POST", f"/v1/datasets/{dataset_id}/rows", params={"append": str(i > 0).lower()},
                             content=body.encode(), headers={"content-type": "application/x-ndjson"})

    def _with_defaults(self, training_config: TrainingConfig) -> dict[str, Any]:
        tc = training_config.model_dump(mode="json")
        tc["fsdp_config"] = {**self.config.fsdp_config, **(training_config.fsdp_config or {})}
        tc["torch_run_config"] = {**self.config.torch_run_config, **(training_config.torch_run_config or {})}
        return tc

    async def _submit(self, route: str, training_config: TrainingConfig, body: dict[str, Any]) -> PostTrainingJob:
        dc = data_config_of(training_config)
        await self._upload(dc.dataset_id, "training_config.data_config.dataset_id")
        if dc.validation_dataset_id:
            await self._upload(dc.validation_dataset_id, "training_config.data_config.validation_dataset_id")
        body["training_config"] = self._with_defaults(training_config)
        out = await self._call("POST", f"/v1/post-training/{route}", idempotent=False, json=body)
        return PostTrainingJob(job_uuid=out["job_uuid"])

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
            raise BadRequest("model: required (a model directory on the training service's machine)")
        body = {
            "job_uuid": job_uuid, "model": model, "checkpoint_dir": checkpoint_dir,
            "hyperparam_search_config": hyperparam_search_config, "logger_config": logger_config,
            "algorithm_config": sent_fields(algorithm_config) if algorithm_config else None,
        }
        return await self._submit("supervised-fine-tune", training_config, body)

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
        `finetuned_model` names the result)."""
        body = {
            "job_uuid": job_uuid, "finetuned_model": finetuned_model, "model": model, "checkpoint_dir": checkpoint_dir,
            "algorithm_config": sent_fields(algorithm_config),
            "hyperparam_search_config": hyperparam_search_config, "logger_config": logger_config,
        }
        return await self._submit("preference-optimize", training_config, body)

    async def get_training_jobs(self) -> ListPostTrainingJobsResponse:
        out = await self._call("GET", "/v1/post-training/jobs")
        return ListPostTrainingJobsResponse(data=[PostTrainingJob(job_uuid=j["job_uuid"]) for j in out["data"]])

    async def get_training_job_status(self, job_uuid: str) -> PostTrainingJobStatusResponse:
        status = await self._call("GET", "/v1/post-training/job/status", params={"job_uuid": job_uuid})
        if status.get("status") == "completed":
            await self.stack_models.register_final(job_uuid, status.get("checkpoints") or [], f"job:{job_uuid}")
        return PostTrainingJobStatusResponse(**status)

    async def cancel_training_job(self, job_uuid: str) -> None:
        await self._call("POST", "/v1/post-training/job/cancel", json={"job_uuid": job_uuid})

    async def get_training_job_artifacts(self, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        artifacts = await self._call("GET", "/v1/post-training/job/artifacts", params={"job_uuid": job_uuid})
        checkpoints = artifacts.get("checkpoints")
        # the job's status only while its last checkpoint is not a model yet: one HTTP call, once
        models = self.stack_models
        if checkpoints and models.enabled and not await models.has(checkpoints[-1]["identifier"]):
            status = await self._call("GET", "/v1/post-training/job/status", params={"job_uuid": job_uuid})
            if status.get("status") == "completed":
                await models.register_final(job_uuid, checkpoints, f"job:{job_uuid}")
        return PostTrainingJobArtifactsResponse(**artifacts)
