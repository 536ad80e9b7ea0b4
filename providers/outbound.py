"""What the service may reach on its own behalf, as its operator declares it (`--outbound-config FILE`).

The rule: the service never calls a URL, reads an environment variable or uses a secret that a client
names. Operators declare chat endpoints (with the variable holding each one's key), the Hub token and
the namespaces it may publish to, and whether models may be downloaded from the Hub; requests pick an
endpoint by name and a Hub repository by its name inside an allowed namespace.

    outbound:
      endpoints:
        vllm: {base_url: "http://vllm:8000/v1", api_key_env: VLLM_API_KEY, models: [Qwen/Qwen2.5-72B-Instruct]}
      hub: {token_env: HF_TOKEN, allowed_namespaces: [my-org], allow_public: false}
      hub_downloads: {allow_download: false, max_download_gb: 20}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from .errors import BadRequest

ENDPOINT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
HUB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$"  # a Hub namespace (user or org) or repository name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Endpoint(_Strict):
    """An OpenAI-compatible chat endpoint the service may call (vLLM, Ollama, a hosted API)."""

    base_url: str = Field(max_length=2000)
    api_key_env: str | None = Field(None, pattern=ENV_NAME)  # the service's variable holding its key
    models: list[str] | None = None  # the models requests may ask of it; None: any

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"{v!r} is not an http(s)://HOST[:PORT]/PATH URL")
        return v.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class HubPublishing(_Strict):
    """Where exports may be pushed. Without `token_env` (or with the variable unset) every push is a dry run."""

    token_env: str | None = Field(None, pattern=ENV_NAME)
    allowed_namespaces: list[str] = Field(default_factory=list)  # users or orgs repos may be created in
    allow_public: bool = False  # a request may ask for a public repository
    allow_existing_repos: bool = False  # a push may commit to a repository that already exists

    @field_validator("allowed_namespaces")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        import re

        bad = [n for n in v if not re.match(HUB_NAME, n)]
        if bad:
            raise BadRequest(f"{bad} are not Hub user or organisation names")
        return v

    @model_validator(mode="after")
    def _token_needs_namespaces(self):
        if self.token_env and not self.allowed_namespaces:
            raise BadRequest("token_env is set but allowed_namespaces is empty: name the namespaces pushes may go to")
        return self

    def token(self) -> str | None:
        return (os.environ.get(self.token_env) or None) if self.token_env else None


class HubDownloads(_Strict):
    """Whether a model id a request names may be downloaded from the Hub into the cache (else: cache only)."""

    allow_download: bool = False
    max_download_gb: float = Field(20.0, gt=0)  # the repository's files in total, checked before downloading


class OutboundConfig(_Strict):
    endpoints: dict[str, Endpoint] = Field(default_factory=dict)
    hub: HubPublishing = Field(default_factory=HubPublishing)
    hub_downloads: HubDownloads = Field(default_factory=HubDownloads)

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, v: dict[str, Endpoint]) -> dict[str, Endpoint]:
        import re

        bad = [n for n in v if not re.match(ENDPOINT_NAME, n)]
        if bad:
            raise BadRequest(f"{bad}: endpoint names are 1-64 letters, digits, '.', '_' or '-'")
        return v


def declared(endpoints: Mapping[str, Endpoint]) -> str:
    return f"one of {sorted(endpoints)}" if endpoints else "this service declares none (outbound.endpoints)"


def pick_endpoint(field: str, name: str, model: str, endpoints: Mapping[str, Endpoint]) -> Endpoint:
    """The endpoint a request names, which must be declared and offer `model`; errors name `field`."""
    endpoint = endpoints.get(name)
    if endpoint is None:
        raise BadRequest(f"{field}.endpoint: {name!r} is not an endpoint of this service; name an endpoint the "
                         f"operator declared: {declared(endpoints)}")
    if endpoint.models is not None and model not in endpoint.models:
        raise BadRequest(f"{field}.model: {model!r} is not offered by endpoint {name!r}; it serves {endpoint.models}")
    if endpoint.api_key_env and not endpoint.api_key():
        raise BadRequest(f"{field}.endpoint: {name!r} has no key on this service (its operator set api_key_env "
                         f"{endpoint.api_key_env}, which is unset)")
    return endpoint


def read_outbound_config(path: str) -> OutboundConfig:
    """The outbound settings from a YAML (or JSON) file; a bad file stops start-up naming the key."""
    import logging

    from .config_file import read_section

    config = read_section(path, "--outbound-config", "outbound", OutboundConfig)
    log = logging.getLogger("providers.remote_fsdp")
    for name, endpoint in config.endpoints.items():
        if endpoint.api_key_env and not endpoint.api_key():
            log.warning("outbound endpoint %s: %s is not set; requests naming it are refused", name, endpoint.api_key_env)
    if config.hub.token_env and not config.hub.token():
        log.warning("outbound hub: %s is not set; Hub exports are dry runs", config.hub.token_env)
    return config
