"""The Agent Spec: pydantic models, the single source of the schema.

An agent is six independent parts -- ``base``, ``model``, ``mcpServers``,
``partnerAgents``, ``knowledge``, ``memory`` -- so that each can change and reload
alone, plus an optional ``deployment`` part (replicas per track, resources, autoscaling)
that the controller reads and the engine ignores. Beside them: Prompt Center entries, MCP
Registry entries and release policies.

Wire names are camelCase (the seed's JSON validates as written); Python names are
snake_case. Every model forbids unknown fields and is frozen. Secret-bearing fields
are typed :data:`Secret` so that :mod:`specmesh.spec.secretpaths` can find them.
A spec is pure data: nothing in it names code to load.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from specmesh import jsonbounds
from specmesh.callers import check_principal_pattern
from specmesh.errors import SecretReferenceError
from specmesh.names import LOGICAL_NAME_PATTERN, MAX_NAME_LENGTH, check_logical_name
from specmesh.regex import MAX_PATTERN_LENGTH, check_pattern
from specmesh.secrets import VaultRef, is_reference

__all__ = [
    "API_VERSION",
    "MAX_ANALYSIS_STEPS",
    "MAX_EVALUATION_CASES",
    "MAX_REPLICAS",
    "PART_NAMES",
    "AgentBase",
    "AgentManifest",
    "AgentSpec",
    "AnalysisGates",
    "AnalysisSpec",
    "AnalysisStep",
    "AutoscalingSpec",
    "CallersSpec",
    "CanaryTrackSpec",
    "ChunkingSpec",
    "CompressionSpec",
    "ConnectionPoolSpec",
    "ContainerResources",
    "CredentialTemplate",
    "DeploymentSpec",
    "EmbeddingModelSpec",
    "EvaluationCase",
    "EvaluationSpec",
    "FallbackModel",
    "HeaderMatch",
    "KeywordSearch",
    "KnowledgeSpec",
    "Manifest",
    "McpServerManifest",
    "McpServerRef",
    "McpServerSpec",
    "McpServersPart",
    "MemorySpec",
    "Metadata",
    "ModelPriceSpec",
    "ModelSpec",
    "OutlierDetectionSpec",
    "PartnerAgentRef",
    "PartnerAgentsPart",
    "PromptEntry",
    "PromptManifest",
    "PromptRelease",
    "RecentSearch",
    "ReleaseManifest",
    "ReleaseSpec",
    "Resolution",
    "ResolvedPrompt",
    "ResourceAmounts",
    "ResourcesSpec",
    "RetrievalSpec",
    "RetrySpec",
    "SecretMarker",
    "SemanticSearch",
    "SkillSpec",
    "SpecModel",
    "TrackSpec",
    "TracksSpec",
    "VectorStoreSpec",
]

API_VERSION = "specmesh.io/v1"

#: The parts, by their wire name, in a fixed order: the six the engine runs, then the
#: ``deployment`` part the controller runs it by.
PART_NAMES: tuple[str, ...] = (
    "base",
    "model",
    "mcpServers",
    "partnerAgents",
    "knowledge",
    "memory",
    "deployment",
)


class SpecModel(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields refused, frozen."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
        str_strip_whitespace=False,
    )


# ---------------------------------------------------------------- field types


class SecretMarker:
    """Metadata marking a string field as secret-bearing (a plaintext or a reference)."""

    def __repr__(self) -> str:
        return "SecretMarker()"


def _check_secret(value: str) -> str:
    if is_reference(value):
        try:
            VaultRef.parse(value)
        except SecretReferenceError as e:
            raise PydanticCustomError(
                "secret_reference", "bad secret reference: {reason}", {"reason": e.reason}
            ) from None
    return value


Secret = Annotated[
    str,
    SecretMarker(),
    Field(
        min_length=1,
        max_length=8192,
        json_schema_extra={"x-specmesh-secret": True},
        description="A secret: a vault://<mount>/<path>#<field> reference, or a plaintext "
        "value that apply moves into Vault and replaces with a reference.",
    ),
    AfterValidator(_check_secret),
]


def _check_name(value: str) -> str:
    reason = check_logical_name(value)
    if reason is not None:
        raise PydanticCustomError("name", "invalid name: {reason}", {"reason": reason})
    return value


Name = Annotated[
    str,
    Field(max_length=MAX_NAME_LENGTH, json_schema_extra={"pattern": LOGICAL_NAME_PATTERN}),
    AfterValidator(_check_name),
]
"""A logical name: an agent, a prompt key, an MCP server."""

Version = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"),
]


def _no_url_credentials(where: str) -> AfterValidator:
    """A URL (or address) must not carry ``user:password@``: the spec lands in etcd as it
    is, so credentials go in ``where`` (a secret, moved into Vault). Nothing of the value
    is echoed; it may hold a password."""

    def check(value: str) -> str:
        if any(c.isspace() or _is_control(c) for c in value):
            raise PydanticCustomError(
                "url", "must not hold spaces or control characters (CR, LF, NUL...)", {}
            )
        try:
            netloc = urlsplit(value).netloc
        except ValueError:
            netloc = value  # malformed (an unclosed IPv6 bracket): judged by the URL check
        if "@" in netloc:
            raise PydanticCustomError(
                "url_credentials",
                "credentials in the URL are not allowed; put them in {where} "
                "(a vault:// reference)",
                {"where": where},
            )
        return value

    return AfterValidator(check)


def _check_url(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError as e:
        raise PydanticCustomError("url", "not a valid URL ({error})", {"error": str(e)}) from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PydanticCustomError(
            "url", "must be an http:// or https:// URL (got {value})", {"value": repr(value)}
        )
    return value


HttpUrl = Annotated[
    str,
    Field(max_length=2048),
    _no_url_credentials("apiKey"),
    AfterValidator(_check_url),
]
"""An http(s) URL of a model provider, without credentials (they go in ``apiKey``)."""

McpUrl = Annotated[
    str,
    Field(max_length=2048),
    _no_url_credentials("each agent's mcpServers[].headers or queryParams"),
    AfterValidator(_check_url),
]
"""An MCP server's http(s) URL, without credentials (each agent supplies its own)."""

StoreAddress = Annotated[str, Field(max_length=2048), _no_url_credentials("credentials")]
"""A store's URL or folder, without credentials (they go in ``credentials``)."""


def _json_object(value: Any) -> Any:
    """Accept a JSON object written as a string (the seed writes ``"variables": "{}"``)."""
    if isinstance(value, str):
        try:
            parsed = jsonbounds.loads(value)
        except json.JSONDecodeError as e:
            raise PydanticCustomError(
                "json_object",
                "must be a JSON object or a string holding one ({error})",
                {"error": e.msg},
            ) from None
        except jsonbounds.JsonTooDeepError as e:
            raise PydanticCustomError(
                "json_object",
                "must be a JSON object or a string holding one ({error})",
                {"error": str(e)},
            ) from None
        return parsed
    return value


_VariableMap = Annotated[
    dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=16384)]],
    Field(max_length=64),
]

Variables = Annotated[
    _VariableMap,
    # The JSON Schema shows what is accepted: the object, or a string holding one.
    BeforeValidator(_json_object, json_schema_input_type=_VariableMap | str),
]

Headers = Annotated[
    dict[
        Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.-]+$")],
        Secret,
    ],
    Field(max_length=64),
]
"""Header / query-parameter / credential names (letters, digits, ``_.-``) -> secret values."""

_CONTROL_NAMES = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)", "\x00": "a NUL"}


def _is_control(c: str) -> bool:
    return c < " " or c == "\x7f"


def _check_header_value(value: str) -> str:
    """RFC 9110 field value: no control characters but HTAB (a CR or LF would let the
    value add headers of its own). The value is a secret: only the kind of character
    and its position are told."""
    for i, c in enumerate(value):
        if c != "\t" and _is_control(c):
            what = _CONTROL_NAMES.get(c, f"control character U+{ord(c):04X}")
            raise PydanticCustomError(
                "header_value",
                "a header value must not hold control characters; found {what} at "
                "character {position} (the value is not shown)",
                {"what": what, "position": i + 1},
            )
    return value


HeaderSecret = Annotated[Secret, AfterValidator(_check_header_value)]
"""A secret sent as (part of) an HTTP header value."""

_HeaderName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.-]+$")]

HeaderMap = Annotated[dict[_HeaderName, HeaderSecret], Field(max_length=64)]
"""HTTP header names (letters, digits, ``_.-``: RFC 9110 tokens) -> secret header values."""


# ---------------------------------------------------------------- base


class SkillSpec(SpecModel):
    """A skill advertised on the agent card."""

    id: Annotated[str, Field(min_length=1, max_length=128)]
    """Stable identifier of the skill."""
    name: Annotated[str, Field(min_length=1, max_length=256)]
    """Human-readable name."""
    description: Annotated[str, Field(max_length=4096)] = ""
    """What the skill does."""
    tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)] = []
    """Keywords for discovery."""
    examples: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=32)] = []
    """Example requests."""


def _principal_pattern(value: str) -> str:
    problem = check_principal_pattern(value)
    if problem:
        raise PydanticCustomError(
            "principal",
            "principal pattern '{pattern}': {problem}",
            {"pattern": value[:80], "problem": problem},
        )
    return value


PrincipalPattern = Annotated[str, AfterValidator(_principal_pattern)]


def _caller_agent(value: str) -> str:
    if value == "*":
        return value
    problem = check_logical_name(value)
    if problem:
        raise PydanticCustomError("agent_name", "{problem}", {"problem": problem})
    return value


CallerAgent = Annotated[str, AfterValidator(_caller_agent)]


class CallersSpec(SpecModel):
    """Who may call this agent (checked by its sidecar; rendered into Istio's
    AuthorizationPolicy). Without ``callers``: every agent that lists this one among its
    partners, and no external client."""

    agents: Annotated[list[CallerAgent], Field(max_length=256)] = ["*"]
    """Agents (logical names) that may call, when they also list this agent among their
    partners; ``*``: every agent that does (the default); ``[]``: none."""
    principals: Annotated[list[PrincipalPattern], Field(max_length=64)] = []
    """External callers by request principal ``<iss>/<sub>`` of their bearer token (a JWT
    of an issuer the sidecars trust, or one the control plane issued: ``specmesh/<name>``);
    ``*`` is any authenticated caller, and one ``*`` may start or end a pattern."""


class AgentBase(SpecModel):
    """The base part: what the agent is and which Prompt Center prompt drives it."""

    description: Annotated[str, Field(min_length=1, max_length=4096)]
    """What the agent does; shown on its agent card and to partner agents."""
    prompt_key: Name
    """Key of the system prompt in the Prompt Center."""
    prompt_version: Version | None = None
    """Pin one prompt version; when unset the prompt's release (labels, A/B weights) decides."""
    prompt_label: Annotated[str, Field(max_length=64)] | None = None
    """Use the version the prompt's release gives this label (e.g. ``prod``)."""
    variables: Variables = {}
    """Values for the prompt template's variables; they override the prompt's defaults."""
    skills: Annotated[list[SkillSpec], Field(max_length=64)] = []
    """Skills advertised on the agent card."""
    callers: CallersSpec | None = None
    """Who may call the agent (default: the agents that list it as a partner, no one else)."""

    @model_validator(mode="after")
    def _one_selector(self) -> AgentBase:
        if self.prompt_version is not None and self.prompt_label is not None:
            raise PydanticCustomError("exclusive", "set promptVersion or promptLabel, not both", {})
        return self


# ---------------------------------------------------------------- model


class ModelPriceSpec(SpecModel):
    """What a model costs, in USD per one million tokens; overrides litellm's price map."""

    input_per_million: Annotated[float, Field(ge=0, le=1_000_000)]
    """USD per 1M prompt (input) tokens."""
    output_per_million: Annotated[float, Field(ge=0, le=1_000_000)]
    """USD per 1M completion (output) tokens."""


class FallbackModel(SpecModel):
    """A model tried when the primary fails."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    """Model name as the provider knows it."""
    provider: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9_-]+$")] | None = None
    """litellm provider prefix (``openai``, ``anthropic``...); default ``openai`` when a
    baseUrl is set (any OpenAI-compatible server)."""
    base_url: HttpUrl | None = None
    """Base URL of the provider's API."""
    api_key: HeaderSecret | None = None
    """API key (a vault:// reference once applied)."""
    price: ModelPriceSpec | None = None
    """This model's price (overrides litellm's price map; a model priced nowhere is
    flagged ``unpriced``, never counted as free)."""


class ModelSpec(SpecModel):
    """The model part: which LLM the agent calls and how."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    """Model name as the provider knows it (``qwen-plus-latest``, ``gpt-4o``)."""
    provider: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9_-]+$")] | None = None
    """litellm provider prefix; default ``openai`` (any OpenAI-compatible server)."""
    base_url: HttpUrl | None = None
    """Base URL of the provider's API; the sidecar forwards to it."""
    api_key: HeaderSecret | None = None
    """API key (a vault:// reference once applied); only the sidecar ever reads it."""
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    """Sampling temperature, 0 to 2."""
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    """Nucleus sampling, (0, 1]."""
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Most tokens one completion may produce."""
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 60
    """Timeout of one model call."""
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    """Retries of a failed model call."""
    fallbacks: Annotated[list[FallbackModel], Field(max_length=5)] = []
    """Models tried in order when this one fails."""
    stream: bool = True
    """Stream tokens from the model when the caller streams."""
    price: ModelPriceSpec | None = None
    """The model's price (overrides litellm's price map; a model priced nowhere is flagged
    ``unpriced``, never counted as free)."""
    budget_per_request_usd: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    """Most one request may spend, in USD, over its whole chain (this agent's model calls
    and every partner's answer); a caller's smaller budget (A2A metadata
    ``specmesh.budgetUsd``) wins. The sidecar refuses a call that would pass it."""


# ---------------------------------------------------------------- mcpServers


class McpServerRef(SpecModel):
    """An MCP server this agent uses; the name resolves in the MCP Registry."""

    mcp_server_name: Name
    """Name of the server in the MCP Registry."""
    query_params: Headers = {}
    """Query parameters the sidecar adds to each request (values are secrets)."""
    headers: HeaderMap = {}
    """Headers the sidecar adds to each request (values are secrets)."""
    allowed_tools: (
        Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=256)]
        | None
    ) = None
    """Only these tools are offered to the model; all when unset."""


class McpServersPart(SpecModel):
    """The ``mcp-servers.json`` part file."""

    mcp_servers: Annotated[list[McpServerRef], Field(max_length=64)] = []
    """MCP servers this agent uses."""


# ---------------------------------------------------------------- partnerAgents


class PartnerAgentRef(SpecModel):
    """A partner agent this agent may call over A2A; the name resolves in the Agent Registry."""

    agent_name: Name
    """Logical name of the partner agent."""
    headers: HeaderMap = {}
    """Headers the sidecar adds to calls to this partner (values are secrets)."""
    query_params: Headers = {}
    """Query parameters the sidecar adds to calls to this partner (values are secrets)."""


class PartnerAgentsPart(SpecModel):
    """The ``partner-agents.json`` part file."""

    agents: Annotated[list[PartnerAgentRef], Field(max_length=64)] = []
    """Partner agents this agent may call."""


# ---------------------------------------------------------------- knowledge


class VectorStoreSpec(SpecModel):
    """Where the knowledge base's vectors live."""

    type: Literal["chroma"]
    """Vector store kind: ``chroma`` (embedded on disk, or a Chroma server)."""
    address: StoreAddress | None = None
    """A Chroma server URL (``http(s)://host:port``), or a local folder for the embedded
    form; default: embedded, in the engine's data folder."""
    collection: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
    """Collection holding this agent's chunks."""
    credentials: Headers = {}
    """Credentials for a server form (values are secrets)."""


class EmbeddingModelSpec(SpecModel):
    """The embedding model, called through litellm via the sidecar."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    """Embedding model name."""
    provider: Annotated[str, Field(max_length=64, pattern=r"^[a-z0-9_-]+$")] | None = None
    """litellm provider prefix; default ``openai``."""
    base_url: HttpUrl | None = None
    """Base URL of the provider's API; default: the model part's."""
    api_key: HeaderSecret | None = None
    """API key; default: the model part's."""
    dimensions: Annotated[int, Field(ge=1, le=16384)] | None = None
    """Vector size, when the model lets you choose."""


class RetrievalSpec(SpecModel):
    """How retrieved passages reach the model."""

    mode: Literal["auto", "tool"] = "auto"
    """``auto`` injects passages into the prompt; ``tool`` offers a ``search_knowledge`` tool."""
    top_k: Annotated[int, Field(ge=1, le=50)] = 4
    """Passages per query."""
    score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Passages scoring below this are dropped."""


class ChunkingSpec(SpecModel):
    """How documents are cut into chunks at ingest."""

    size: Annotated[int, Field(ge=64, le=16384)] = 800
    """Characters per chunk."""
    overlap: Annotated[int, Field(ge=0, le=8192)] = 100
    """Characters shared by consecutive chunks."""

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSpec:
        if self.overlap >= self.size:
            raise PydanticCustomError(
                "overlap",
                "overlap must be smaller than size (got overlap {overlap}, size {size})",
                {"overlap": self.overlap, "size": self.size},
            )
        return self


class KnowledgeSpec(SpecModel):
    """The knowledge part: retrieval-augmented generation over a vector store."""

    enabled: bool = False
    """Whether the agent uses a knowledge base."""
    store: VectorStoreSpec | None = None
    """The vector store; required when enabled."""
    embedding_model: EmbeddingModelSpec | None = None
    """The embedding model; required when enabled."""
    retrieval: RetrievalSpec = RetrievalSpec()
    """How passages reach the model."""
    chunking: ChunkingSpec = ChunkingSpec()
    """How documents are chunked at ingest."""

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> KnowledgeSpec:
        if self.enabled and (self.store is None or self.embedding_model is None):
            raise PydanticCustomError(
                "required_when_enabled",
                "store and embeddingModel are required when enabled is true",
                {},
            )
        return self


# ---------------------------------------------------------------- memory


class CompressionSpec(SpecModel):
    """Summarise older turns once the history passes a token budget."""

    enabled: bool = False
    """Whether to compress long histories."""
    max_prompt_tokens: Annotated[int, Field(ge=256, le=1_000_000)] = 4000
    """Token budget of the history sent to the model."""
    keep_recent_turns: Annotated[int, Field(ge=0, le=1000)] = 6
    """Most recent turns always kept verbatim."""
    summary_max_tokens: Annotated[int, Field(ge=16, le=100_000)] = 512
    """Size limit of the summary."""


class RecentSearch(SpecModel):
    """Recall the last N turns."""

    type: Literal["recent"] = "recent"
    n: Annotated[int, Field(ge=1, le=10_000)] = 20
    """Turns recalled."""


class KeywordSearch(SpecModel):
    """Recall turns sharing words with the question."""

    type: Literal["keyword"]
    top_k: Annotated[int, Field(ge=1, le=1000)] = 8
    """Turns recalled."""


class SemanticSearch(SpecModel):
    """Recall turns whose embeddings are nearest to the question's."""

    type: Literal["semantic"]
    top_k: Annotated[int, Field(ge=1, le=1000)] = 8
    """Turns recalled."""
    min_score: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Turns scoring below this are dropped."""
    embedding_model: EmbeddingModelSpec | None = None
    """Embedding model; default: the knowledge part's."""


SearchStrategy = Annotated[
    RecentSearch | KeywordSearch | SemanticSearch, Field(discriminator="type")
]


class MemorySpec(SpecModel):
    """The memory part: conversation history per A2A contextId."""

    storage_type: Literal["inMemory", "redis"] = "inMemory"
    """``inMemory`` (one instance) or ``redis`` (shared by every instance of the agent)."""
    address: StoreAddress | None = None
    """Store address (``redis://host:6379/0``); required for redis."""
    credentials: Headers = {}
    """Store credentials (values are secrets)."""
    ttl_seconds: Annotated[int, Field(ge=60, le=31_536_000)] | None = None
    """Conversations idle longer than this are deleted; kept forever when unset."""
    compression: CompressionSpec = CompressionSpec()
    """Summarisation of long histories."""
    search_strategy: SearchStrategy = RecentSearch()
    """How past turns are recalled."""

    @model_validator(mode="after")
    def _address_for_redis(self) -> MemorySpec:
        if self.storage_type == "redis":
            if not self.address:
                raise PydanticCustomError(
                    "required_for_redis", "address is required when storageType is redis", {}
                )
            if urlsplit(self.address).scheme not in ("redis", "rediss"):
                raise PydanticCustomError(
                    "url",
                    "address must be a redis:// or rediss:// URL (got {value})",
                    {"value": repr(self.address)},
                )
        return self


# ---------------------------------------------------------------- deployment

MAX_REPLICAS = 100
"""Most replicas of one track (and the highest autoscaling ``max``)."""

Quantity = Annotated[
    str,
    Field(
        max_length=32,
        pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$",
        examples=["250m", "1", "512Mi"],
    ),
]
"""A Kubernetes resource quantity (``250m`` CPU, ``512Mi`` memory)."""


class ResourceAmounts(SpecModel):
    """CPU and memory of one container."""

    cpu: Quantity | None = None
    """CPU (``250m`` is a quarter of a core)."""
    memory: Quantity | None = None
    """Memory (``512Mi``)."""


class ContainerResources(SpecModel):
    """Requests and limits of one container."""

    requests: ResourceAmounts = ResourceAmounts()
    """What the scheduler reserves."""
    limits: ResourceAmounts = ResourceAmounts()
    """The most the container may use."""


class ResourcesSpec(SpecModel):
    """Resources of the engine and the sidecar; unset ones take the runtime's defaults
    (the Helm chart's ``agentDefaults.resources``)."""

    engine: ContainerResources | None = None
    """The engine container."""
    sidecar: ContainerResources | None = None
    """The sidecar container."""


class TrackSpec(SpecModel):
    """One release track's workload."""

    replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = 1
    """Instances (engine + sidecar pairs) of the track; 0 stops the track."""


class CanaryTrackSpec(TrackSpec):
    """The canary track: runs when enabled or while a release names a canary revision."""

    enabled: bool = False
    """Run the canary track even when no release names a canary revision."""


class TracksSpec(SpecModel):
    """The release tracks an agent runs."""

    stable: TrackSpec = TrackSpec()
    """Track ``stable`` (the release's stable revision, or the latest)."""
    canary: CanaryTrackSpec = CanaryTrackSpec()
    """Track ``canary`` (the release's canary revision)."""


class AutoscalingSpec(SpecModel):
    """Scaling each track between ``min`` and ``max`` on CPU (a HorizontalPodAutoscaler on
    Kubernetes; the local supervisor runs ``min`` instances)."""

    enabled: bool = False
    """Scale automatically (``replicas`` are then ignored)."""
    min: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 2
    """Fewest instances of a track."""
    max: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 5
    """Most instances of a track."""
    target_cpu: Annotated[int, Field(ge=1, le=100, alias="targetCPU")] = 70
    """Average CPU use, in percent of the request, to scale toward."""

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingSpec:
        if self.min > self.max:
            raise PydanticCustomError(
                "min_gt_max", "min ({min}) is above max ({max})", {"min": self.min, "max": self.max}
            )
        return self


class DeploymentSpec(SpecModel):
    """How the agent runs: instances per track, resources, autoscaling. Versioned with the
    other parts; the controller reads the current revision's, for every track."""

    tracks: TracksSpec = TracksSpec()
    """Replicas of each release track."""
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    """Automatic scaling of each track."""
    resources: ResourcesSpec = ResourcesSpec()
    """Container resources."""


# ---------------------------------------------------------------- the agent


class AgentSpec(SpecModel):
    """All six parts of one agent."""

    base: AgentBase
    """Description, prompt and skills."""
    model: ModelSpec
    """The LLM."""
    mcp_servers: Annotated[list[McpServerRef], Field(max_length=64)] = []
    """MCP servers (same content as ``mcp-servers.json``'s ``mcpServers``)."""
    partner_agents: Annotated[list[PartnerAgentRef], Field(max_length=64)] = []
    """Partner agents (same content as ``partner-agents.json``'s ``agents``)."""
    knowledge: KnowledgeSpec = KnowledgeSpec()
    """Knowledge base (RAG)."""
    memory: MemorySpec = MemorySpec()
    """Conversation memory."""
    deployment: DeploymentSpec = DeploymentSpec()
    """How the agent runs (the controller's part; the engine ignores it)."""


class Metadata(SpecModel):
    """Manifest metadata."""

    name: Name
    """Logical name of the object."""
    labels: Annotated[
        dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=256)]],
        Field(max_length=64),
    ] = {}
    """Free-form labels."""
    annotations: Annotated[
        dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=4096)]],
        Field(max_length=64),
    ] = {}
    """Free-form annotations."""


class AgentManifest(SpecModel):
    """An agent as one document."""

    api_version: Literal["specmesh.io/v1"]
    kind: Literal["Agent"]
    metadata: Metadata
    spec: AgentSpec


# ---------------------------------------------------------------- Prompt Center


class PromptEntry(SpecModel):
    """One version of a prompt in the Prompt Center (immutable once published)."""

    prompt_key: Name
    """The prompt's key."""
    version: Version
    """Version of this entry (e.g. ``3.0.11``)."""
    template: Annotated[str, Field(min_length=1, max_length=262_144)]
    """The template; ``{{name}}`` placeholders are filled from the variables."""
    variables: Variables = {}
    """Default values of the template's variables (an object, or a string holding one)."""
    description: Annotated[str, Field(max_length=4096)] = ""
    """What the prompt is for."""


class PromptRelease(SpecModel):
    """Which version of a prompt serves: labels and A/B weights."""

    labels: Annotated[
        dict[Annotated[str, Field(max_length=64)], Version], Field(max_length=32)
    ] = {}
    """Label -> version (e.g. ``prod: 3.0.11``)."""
    weights: Annotated[
        dict[Version, Annotated[int, Field(ge=0, le=100)]], Field(max_length=16)
    ] = {}
    """Version -> share of conversations in percent; must sum to 100 when set."""
    current: Version | None = None
    """The version served when no pin, label or weights apply (set by a prompt rollback);
    the highest version when unset."""

    @model_validator(mode="after")
    def _weights_sum(self) -> PromptRelease:
        if self.weights and sum(self.weights.values()) != 100:
            raise PydanticCustomError(
                "weights_sum",
                "weights must sum to 100 (got {total})",
                {"total": sum(self.weights.values())},
            )
        return self


class PromptSpec(SpecModel):
    """The ``spec`` of a Prompt manifest: a version, optionally with the prompt's release."""

    version: Version
    """Version of this entry."""
    template: Annotated[str, Field(min_length=1, max_length=262_144)]
    """The template."""
    variables: Variables = {}
    """Default values of the template's variables."""
    description: Annotated[str, Field(max_length=4096)] = ""
    """What the prompt is for."""
    release: PromptRelease | None = None
    """Labels and A/B weights to set with this version."""


class PromptManifest(SpecModel):
    """A Prompt Center version as a manifest."""

    api_version: Literal["specmesh.io/v1"]
    kind: Literal["Prompt"]
    metadata: Metadata
    spec: PromptSpec


# ---------------------------------------------------------------- MCP Registry


class CredentialTemplate(SpecModel):
    """Which credentials an agent must supply to use an MCP server."""

    headers: Annotated[list[_HeaderName], Field(max_length=32)] = []
    """Header names each agent's spec must set."""
    query_params: Annotated[list[_HeaderName], Field(max_length=32)] = []
    """Query-parameter names each agent's spec must set."""


class McpServerSpec(SpecModel):
    """An MCP Registry entry."""

    transport: Literal["streamable-http", "sse"] = "streamable-http"
    """MCP transport."""
    url: McpUrl
    """Endpoint of the server (e.g. ``http://host:8000/mcp``)."""
    description: Annotated[str, Field(max_length=4096)] = ""
    """What the server offers."""
    credential_template: CredentialTemplate = CredentialTemplate()
    """Credentials an agent must supply."""


class McpServerManifest(SpecModel):
    """An MCP Registry entry as a manifest."""

    api_version: Literal["specmesh.io/v1"]
    kind: Literal["McpServer"]
    metadata: Metadata
    spec: McpServerSpec


# ---------------------------------------------------------------- revisions


class ResolvedPrompt(SpecModel):
    """The prompt versions an agent revision serves (one of ``versions``, ``weights``)."""

    key: Name
    """The prompt's key."""
    versions: Annotated[list[Version], Field(max_length=1)] | None = None
    """The version every conversation gets; empty when none resolved (no version yet, or
    a label no version has)."""
    weights: dict[Version, Annotated[int, Field(ge=1, le=100)]] | None = None
    """The A/B split recorded from the prompt's release: version -> percent."""


class Resolution(SpecModel):
    """What an agent revision runs with besides its spec, resolved when it was written
    (a rollback copies its target's)."""

    prompt: ResolvedPrompt
    """The prompt versions it serves."""
    mcp_servers: dict[str, McpServerSpec] = {}
    """The MCP Registry entries of the servers its spec names (missing ones left out)."""


# ---------------------------------------------------------------- releases


def _check_re2(value: str) -> str:
    reason = check_pattern(value)
    if reason is not None:
        raise PydanticCustomError("regex", "{reason}", {"reason": reason})
    return value


class HeaderMatch(SpecModel):
    """A request header condition that sends a call to the canary."""

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9-]+$")]
    """Header name (case-insensitive)."""
    exact: Annotated[str, Field(max_length=1024)] | None = None
    """Value equals this."""
    prefix: Annotated[str, Field(max_length=1024)] | None = None
    """Value starts with this."""
    regex: (
        Annotated[str, Field(max_length=MAX_PATTERN_LENGTH), AfterValidator(_check_re2)] | None
    ) = None
    """Value matches this RE2 regular expression (whole value; the syntax Istio's header
    match uses). Patterns RE2 refuses (back-references, look-arounds) are refused here."""

    @model_validator(mode="after")
    def _exactly_one(self) -> HeaderMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "one_of", "set exactly one of exact, prefix, regex (got {n})", {"n": len(given)}
            )
        return self


class OutlierDetectionSpec(SpecModel):
    """Ejection of failing instances, with Envoy's outlier-detection semantics."""

    consecutive_5xx_errors: Annotated[int, Field(ge=0, le=1000, alias="consecutive5xxErrors")] = 5
    """5xx responses in a row that eject an instance (0 disables)."""
    consecutive_gateway_errors: Annotated[int, Field(ge=0, le=1000)] = 0
    """502/503/504 or connection errors in a row that eject an instance (0 disables)."""
    interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 10
    """How often ejections are evaluated."""
    base_ejection_time_seconds: Annotated[float, Field(gt=0, le=86_400)] = 30
    """Ejection time; multiplied by the number of times the instance was ejected."""
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50
    """Most instances that may be ejected at once, in percent."""


class RetrySpec(SpecModel):
    """Retries of a failed call."""

    attempts: Annotated[int, Field(ge=0, le=10)] = 2
    """Retries after the first try."""
    per_try_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30
    """Timeout of each try."""
    retry_on: Annotated[str, Field(max_length=256)] = "connect-failure,gateway-error,reset"
    """Envoy retry-on conditions."""
    budget_percent: Annotated[float, Field(ge=0, le=100)] = 20
    """Retries may add at most this share of the request volume."""


class ConnectionPoolSpec(SpecModel):
    """Connection limits toward the agent."""

    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 1024
    """Most connections per instance."""
    max_pending_requests: Annotated[int, Field(ge=1, le=100_000)] = 1024
    """Most requests waiting for a connection."""


MAX_ANALYSIS_STEPS = 10
"""Most steps an analysis may walk."""


class AnalysisStep(SpecModel):
    """One step of a progressive release: the canary's weight, and how long it holds."""

    weight: Annotated[int, Field(ge=1, le=100)]
    """Share of calls sent to the canary during this step, in percent (below 100: a step
    compares the canary with stable over the same window; passing the last step promotes
    the canary, which is what 100 % means)."""
    duration_seconds: Annotated[float, Field(ge=0, le=7 * 86_400)] | None = None
    """Hold the step at least this long."""
    min_canary_requests: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Hold the step until the canary answered at least this many turns."""

    @field_validator("weight")
    @classmethod
    def _below_all(cls, weight: int) -> int:
        if weight == 100:
            raise PydanticCustomError(
                "step_weight_all",
                "a step cannot send 100 % to the canary: stable would answer nothing to "
                "compare it with; passing the last step promotes the canary (100 %)",
                {},
            )
        return weight

    @model_validator(mode="after")
    def _holds(self) -> AnalysisStep:
        if self.duration_seconds is None and self.min_canary_requests is None:
            raise PydanticCustomError(
                "hold_required",
                "set durationSeconds, minCanaryRequests or both (how long the step holds)",
                {},
            )
        return self


class AnalysisGates(SpecModel):
    """What the canary must not be worse at than stable, over the same window. Each gate
    is optional; a gate fails only when the canary is worse beyond its threshold with the
    analysis's confidence (see docs/analysis.md)."""

    max_error_rate_increase: Annotated[float, Field(ge=0, le=1)] | None = None
    """Most the canary's share of failed turns may exceed stable's (0.05: 5 points)."""
    max_p95_latency_ratio: Annotated[float, Field(ge=1, le=100)] | None = None
    """Most the canary's p95 turn latency may be, as a multiple of stable's."""
    max_cost_per_turn_ratio: Annotated[float, Field(ge=1, le=100)] | None = None
    """Most the canary's mean model cost per turn may be, as a multiple of stable's."""


MAX_EVALUATION_CASES = 20
"""Most cases an evaluation may run before a step."""


class EvaluationCase(SpecModel):
    """One prompt sent to the canary through its public entry, and what its answer must be."""

    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    """Shown in the timeline; default ``case <index>``."""
    prompt: Annotated[str, Field(min_length=1, max_length=8000)]
    """The user message sent (a new conversation per case)."""
    contains: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=16)
    ] = []
    """Texts the answer must contain (each, case-sensitive; ``matches`` with ``(?i)`` for
    case-insensitive)."""
    not_contains: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=16)
    ] = []
    """Texts the answer must not contain."""
    matches: (
        Annotated[str, Field(max_length=MAX_PATTERN_LENGTH), AfterValidator(_check_re2)] | None
    ) = None
    """An RE2 regular expression found somewhere in the answer (anchor it with ``^``/``$``
    to match all of it)."""
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 30
    """How long the answer may take; no answer in time fails the case."""

    @model_validator(mode="after")
    def _expects(self) -> EvaluationCase:
        if not (self.contains or self.not_contains or self.matches is not None):
            raise PydanticCustomError(
                "expectation_required",
                "set contains, notContains or matches (what the answer must be)",
                {},
            )
        return self


class EvaluationSpec(SpecModel):
    """Prompts with expected properties, run against the canary through its public entry
    before each step's weight is raised; more than ``maxFailures`` failed cases abort the
    release (see docs/analysis.md)."""

    cases: Annotated[list[EvaluationCase], Field(min_length=1, max_length=MAX_EVALUATION_CASES)]
    """The cases (run at most 4 at a time)."""
    max_failures: Annotated[int, Field(ge=0)] = 0
    """Most cases that may fail (a case that cannot run fails) before the release aborts."""

    @model_validator(mode="after")
    def _fewer_failures_than_cases(self) -> EvaluationSpec:
        if self.max_failures >= len(self.cases):
            raise PydanticCustomError(
                "max_failures",
                "maxFailures must be less than the number of cases (got {m} with {n} cases)",
                {"m": self.max_failures, "n": len(self.cases)},
            )
        return self


class AnalysisSpec(SpecModel):
    """Analysis-gated progressive delivery: the control plane walks the steps, compares
    canary with stable at the end of each, aborts the release when a gate fails and
    promotes the canary when every step passed."""

    steps: Annotated[list[AnalysisStep], Field(min_length=1, max_length=MAX_ANALYSIS_STEPS)]
    """The canary's weights, increasing (e.g. 5 -> 25 -> 50 -> 100)."""
    gates: AnalysisGates = AnalysisGates()
    """What fails a step."""
    min_sample_per_track: Annotated[int, Field(ge=5, le=100_000)] = 30
    """Turns each track must have answered in a step before its gates are judged; with
    fewer the step holds longer (it never aborts for want of data)."""
    confidence: Annotated[float, Field(ge=0.5, le=0.999)] = 0.95
    """One-sided confidence a gate needs that the canary is worse before it fails."""
    evaluation: EvaluationSpec | None = None
    """Prompts with expected answers run against the canary before each step's weight is
    raised (the first included); too many failed cases abort the release."""

    @model_validator(mode="after")
    def _increasing(self) -> AnalysisSpec:
        weights = [s.weight for s in self.steps]
        for i in range(1, len(weights)):
            if weights[i] <= weights[i - 1]:
                raise PydanticCustomError(
                    "weights_increasing",
                    "steps[{i}].weight must be greater than steps[{j}].weight "
                    "(got {w} after {prev})",
                    {"i": i, "j": i - 1, "w": weights[i], "prev": weights[i - 1]},
                )
        return self


class ReleaseSpec(SpecModel):
    """An agent's release policy: stable and canary revisions, split, and resilience."""

    stable_revision: Annotated[int, Field(ge=1)] | None = None
    """Revision served by track ``stable``; latest when unset."""
    canary_revision: Annotated[int, Field(ge=1)] | None = None
    """Revision served by track ``canary``."""
    canary_weight: Annotated[int, Field(ge=0, le=100)] = 0
    """Share of calls sent to the canary, in percent."""
    header_match: Annotated[list[HeaderMatch], Field(max_length=16)] = []
    """Calls matching all of these go to the canary, whatever the weight."""
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 300
    """Timeout of a whole call, retries included."""
    retries: RetrySpec = RetrySpec()
    """Retries."""
    outlier_detection: OutlierDetectionSpec = OutlierDetectionSpec()
    """Ejection of failing instances."""
    connection_pool: ConnectionPoolSpec = ConnectionPoolSpec()
    """Connection limits."""
    analysis: AnalysisSpec | None = None
    """Progressive delivery: steps and gates the control plane walks the canary through,
    aborting or promoting it by itself (see docs/analysis.md)."""

    @model_validator(mode="after")
    def _canary_needs_revision(self) -> ReleaseSpec:
        if (self.canary_weight > 0 or self.header_match) and self.canary_revision is None:
            raise PydanticCustomError(
                "canary_revision_required",
                "canaryRevision is required when canaryWeight > 0 or headerMatch is set",
                {},
            )
        return self


class ReleaseManifest(SpecModel):
    """A release policy as a manifest; ``metadata.name`` is the agent."""

    api_version: Literal["specmesh.io/v1"]
    kind: Literal["Release"]
    metadata: Metadata
    spec: ReleaseSpec


Manifest = Annotated[
    AgentManifest | PromptManifest | McpServerManifest | ReleaseManifest,
    Field(discriminator="kind"),
]
"""Any manifest document, by its ``kind``."""
