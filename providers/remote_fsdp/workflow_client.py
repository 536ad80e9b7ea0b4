"""Client methods for the service's adapter workflow (mixed into TrainingServiceClient):

    svc = TrainingServiceClient("http://127.0.0.1:8322")
    svc.chat("job:sft-1", [{"role": "user", "content": "hi"}])            # OpenAI chat over a checkpoint
    svc.openai_client()                                                    # an openai.OpenAI on the service
    svc.enhance_data("e1", config={...}, rows=rows, wait=True)            # student -> judge -> teacher hint -> retry
    svc.validate_model("v1", "job:sft-1", prompts=heldout, wait=True)     # validation.json / validation.md
    svc.export_model("x1", "job:sft-1", formats=["merged", "gguf", "hub"], hub={"repo": "model"})  # namespace: the operator's
    svc.run_workflow({"workflow_id": "w1", "rows": rows, "enhance": {...}, "train": {...},
                      "validate": {...}, "export": {...}}, callback=print)   # the one-call pipeline
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

ACTIVE = ("scheduled", "in_progress")


class ServiceError(RuntimeError):
    """An error answer of the service: `status`, its `detail` (a string or [{"field", "reason"}]), and the
    request (`method`, `path`)."""

    def __init__(self, method: str, path: str, status: int, text: str):
        super().__init__(f"{method} {path}: {status} {text}")
        self.method, self.path, self.status, self.text = method, path, status, text
        try:
            body = json.loads(text)
            self.detail = body.get("detail", text) if isinstance(body, dict) else text
        except ValueError:
            self.detail = text


def follow_state(fetch: Callable[[], dict], summary: Callable[[dict], Any], what: str,
                 callback: Callable[[dict], None] | None, interval_s: float, timeout_s: float) -> dict:
    """Poll `fetch()` until its `state` is no longer active; `callback` sees every change of `summary`."""
    deadline, seen = time.monotonic() + timeout_s, None
    while True:
        state = fetch()
        key = summary(state)
        if callback and key != seen:
            callback(state)
        seen = key
        if state["state"] not in ACTIVE:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still {state['state']} after {timeout_s}s")
        time.sleep(interval_s)


PATHS = {"enhancements": "/v1/data-enhancement", "validations": "/v1/validations", "exports": "/v1/exports",
         "workflows": "/v1/workflows"}


class WorkflowClientMixin:
    """Needs `base_url`, `timeout_s`, `http` (a requests.Session) and `_call` from TrainingServiceClient."""

    # -- serving -------------------------------------------------------------------------------------
    def openai_client(self):
        """An `openai.OpenAI` client on the service's chat API (models: directories, `job:<uuid>`, ...)."""
        import openai

        token = self.http.headers.get("authorization", "Bearer none").split(" ", 1)[-1]  # type: ignore[attr-defined]
        return openai.OpenAI(base_url=self.base_url + "/v1/openai/v1", api_key=token, timeout=self.timeout_s,
                             max_retries=0)

    def chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> str:
        """One chat completion's text from a served checkpoint."""
        body = {"model": model, "messages": messages, **params}
        return self._call("POST", "/v1/openai/v1/chat/completions", json=body)["choices"][0]["message"]["content"]

    # -- tasks ---------------------------------------------------------------------------------------
    def task(self, kind: str, task_id: str) -> dict:
        return self._call("GET", f"{PATHS[kind]}/{task_id}")

    def task_artifacts(self, kind: str, task_id: str) -> dict:
        return self._call("GET", f"{PATHS[kind]}/{task_id}/artifacts")

    def cancel_task(self, kind: str, task_id: str) -> dict:
        return self._call("POST", f"{PATHS[kind]}/{task_id}/cancel")

    def wait_task(self, kind: str, task_id: str, callback: Callable[[dict], None] | None = None,
                  interval_s: float = 1.0, timeout_s: float = 3600) -> dict:
        """Poll a task until it ends; `callback(state)` sees every change of state or progress."""
        return follow_state(lambda: self.task(kind, task_id), lambda s: (s["state"], repr(s.get("progress"))),
                            f"{kind} {task_id}", callback, interval_s, timeout_s)

    def _submit(self, kind: str, body: dict, wait: bool, callback, interval_s: float) -> dict:
        state = self._call("POST", PATHS[kind], json=body)
        return self.wait_task(kind, state["id"], callback, interval_s) if wait else state

    def enhance_data(self, enhancement_id: str, config: dict, rows: list[dict] | None = None,
                     dataset_id: str | None = None, wait: bool = True, callback=None, interval_s: float = 1.0) -> dict:
        """Data enhancement (POST /v1/data-enhancement); with `wait`, its final state. A role names an
        `endpoint` the service's operator declared, or none (a model the service serves)."""
        body = {"enhancement_id": enhancement_id, "config": config, "rows": rows, "dataset_id": dataset_id}
        return self._submit("enhancements", body, wait, callback, interval_s)

    def resume_enhancement(self, enhancement_id: str) -> dict:
        return self._call("POST", f"/v1/data-enhancement/{enhancement_id}/resume")

    def validate_model(self, validation_id: str, model: str, prompts: list[dict], wait: bool = True,
                       callback=None, interval_s: float = 1.0, **settings: Any) -> dict:
        """Validation report of `model` against its base (POST /v1/validations)."""
        body = {"validation_id": validation_id, "model": model, "prompts": prompts, **settings}
        return self._submit("validations", body, wait, callback, interval_s)

    def export_model(self, export_id: str, model: str, formats: list[str] | None = None, wait: bool = True,
                     callback=None, interval_s: float = 1.0, **settings: Any) -> dict:
        """Merged model / GGUF + Modelfile / Hub push or dry run (POST /v1/exports). `hub={"repo": NAME,
        "namespace": NS, "private": True}`: NS among the namespaces the operator allows; the token is theirs."""
        body = {"export_id": export_id, "model": model, **({"formats": formats} if formats else {}), **settings}
        return self._submit("exports", body, wait, callback, interval_s)

    def run_workflow(self, request: dict, wait: bool = True, callback=None, interval_s: float = 1.0) -> dict:
        """enhance -> train -> validate -> export in one call (POST /v1/workflows)."""
        return self._submit("workflows", request, wait, callback, interval_s)

    def download(self, kind: str, task_id: str, name: str) -> bytes:
        """One file of a task's directory (e.g. 'validate/validation.md', 'enhanced_dataset.jsonl')."""
        r = self.http.get(f"{self.base_url}{PATHS[kind]}/{task_id}/files/{name}", timeout=self.timeout_s)  # type: ignore[attr-defined]
        if r.status_code >= 400:
            raise ServiceError("GET", f"{PATHS[kind]}/{task_id}/files/{name}", r.status_code, r.text)
        return r.content
