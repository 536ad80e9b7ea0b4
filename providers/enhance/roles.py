"""One async OpenAI client per role, with retries and backoff on 429 / 5xx / timeouts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import BadRequest
from ..outbound import Endpoint, declared, pick_endpoint
from .config import RoleConfig


def retryable() -> tuple[type[Exception], ...]:
    """The openai SDK's errors worth another try (429, 5xx, timeouts, connections)."""
    import openai  # here, not at import: the service starts without the SDK (0.44 s), which only enhancement uses

    return openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError


def role_target(field: str, config: RoleConfig, endpoints: Mapping[str, Endpoint], local_base_url: str | None,
                local_api_key: str | None) -> tuple[str, str | None]:
    """(base URL, key) a role talks to: a declared endpoint it names, else the local service. A role that
    carries a URL or a key's variable of its own is refused: they are the operator's to declare."""
    for own in ("base_url", "api_key_env"):
        if getattr(config, own) is not None:
            raise BadRequest(f"{field}.{own}: a request may not choose {'a URL' if own == 'base_url' else 'a key'} "
                             f"for the service to use; name an endpoint the operator declared with "
                             f"`{field}.endpoint`: {declared(endpoints)}")
    if config.endpoint is not None:
        endpoint = pick_endpoint(field, config.endpoint, config.model, endpoints)
        return endpoint.base_url, endpoint.api_key()
    if not local_base_url:
        raise BadRequest(f"{field}.endpoint: needed when no local service serves {config.model!r}: "
                         f"{declared(endpoints)}")
    return local_base_url.rstrip("/"), local_api_key


@dataclass
class RoleStats:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ChatRole:
    """A chat model behind an OpenAI-compatible endpoint."""

    name: str
    config: RoleConfig
    base_url: str
    api_key: str
    stats: RoleStats = field(default_factory=RoleStats)

    def __post_init__(self):
        # Retries are ours (counted, and with the configured backoff), not the client's.
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none",
                                         timeout=self.config.timeout_s, max_retries=0)

    @classmethod
    def create(cls, name: str, config: RoleConfig, endpoints: Mapping[str, Endpoint],
               local_base_url: str | None, local_api_key: str | None) -> ChatRole:
        """The endpoint `config.endpoint` names among `endpoints` (with its key from the variable the operator
        set), or, without one, the local service (`local_base_url`)."""
        base_url, key = role_target(name, config, endpoints, local_base_url, local_api_key)
        return cls(name, config, base_url, key or "none")

    async def chat(self, messages: list[dict[str, str]]) -> str:
        """The model's answer to `messages`."""
        return (await self.reply(messages))[0]

    async def reply(self, messages: list[dict[str, str]]) -> tuple[str, str | None]:
        """(answer, reasoning): the reasoning a server returns beside the answer (vLLM's reasoning parsers,
        DeepSeek: `reasoning_content`; Ollama, OpenRouter: `reasoning`), or None."""
        cfg = self.config
        if cfg.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        import openai

        for attempt in range(cfg.max_retries + 1):
            self.stats.requests += 1
            try:
                r = await self.client.chat.completions.create(
                    model=cfg.model, messages=messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
            except retryable() as e:
                if attempt == cfg.max_retries:
                    self.stats.failures += 1
                    raise RuntimeError(f"{self.name} ({cfg.model} at {self.base_url}): {type(e).__name__} after "
                                       f"{attempt + 1} tries: {e}") from e
                self.stats.retries += 1
                await asyncio.sleep(self._wait(e, attempt))
                continue
            except openai.APIStatusError as e:  # 4xx other than 429: the request is wrong, retrying will not help
                self.stats.failures += 1
                raise RuntimeError(f"{self.name} ({cfg.model} at {self.base_url}): {e.status_code} {e.message}") from e
            if r.usage:
                self.stats.prompt_tokens += r.usage.prompt_tokens
                self.stats.completion_tokens += r.usage.completion_tokens
            message = r.choices[0].message
            extra = message.model_extra or {}
            reasoning = extra.get("reasoning_content") or extra.get("reasoning")
            reasoning = reasoning.strip() if isinstance(reasoning, str) else None
            return (message.content or "").strip(), reasoning or None
        raise AssertionError("unreachable")

    def _wait(self, error: Exception, attempt: int) -> float:
        response = getattr(error, "response", None)
        if response is not None:
            try:
                return min(float(response.headers.get("retry-after", "")), 60.0)
            except ValueError:
                pass
        return self.config.backoff_s * (2**attempt) * (0.75 + 0.5 * random.random())

    async def close(self) -> None:
        await self.client.close()
