"""``nacos-mcp-tools``: Nacos service discovery and configuration as MCP tools.

The examples' own MCP server (``examples/mcp/servers.yaml`` registers it as
``nacos-mcp-tools`` at ``http://127.0.0.1:18801/mcp``), written with the ``mcp`` SDK. It
answers from a fixed in-memory :class:`NacosCatalog` (three namespaces, services with
instances, configs with dataId/group/content), so every answer is deterministic::

    python -m examples.mcp_servers.nacos_tools [--host 127.0.0.1] [--port 18801]

Tools (every ``namespace`` defaults to ``public``):

- ``list_services(namespace)``: services with instance and healthy-instance counts;
- ``get_service(service_name, namespace)``: one service with its instances;
- ``list_configs(namespace)``: the configs' dataId, group and type;
- ``get_config(data_id, group="DEFAULT_GROUP", namespace)``: one config with its content.

An unknown namespace, service or config is a tool error (``isError``) that names what
does exist, so a model can correct itself. Serves streamable HTTP at ``/mcp``; SIGTERM or
SIGINT stops it cleanly (exit 0). Exit codes: 0 stopped, 1 failed to start, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from specmesh.logs import configure_logging
from specmesh.mcpbridge import serve_http

__all__ = [
    "Config",
    "ConfigList",
    "ConfigSummary",
    "Instance",
    "NacosCatalog",
    "NacosNotFoundError",
    "Service",
    "ServiceList",
    "ServiceSummary",
    "create_server",
    "main",
]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1  # argparse exits 2 on bad usage
DEFAULT_PORT = 18801
DEFAULT_NAMESPACE = "public"
DEFAULT_GROUP = "DEFAULT_GROUP"


class _Wire(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True
    )


class Instance(_Wire):
    """One registered instance of a service."""

    ip: str
    port: int
    weight: float = 1.0
    """Share of traffic relative to the other instances."""
    healthy: bool = True
    enabled: bool = True
    ephemeral: bool = True
    """Ephemeral instances are kept alive by client heartbeats."""
    cluster_name: str = "DEFAULT"
    metadata: dict[str, str] = Field(default_factory=dict)


class Service(_Wire):
    """A service as Nacos naming returns it."""

    name: str
    group_name: str = DEFAULT_GROUP
    namespace: str = DEFAULT_NAMESPACE
    protect_threshold: float = 0.0
    """Below this share of healthy instances, unhealthy ones are returned too."""
    metadata: dict[str, str] = Field(default_factory=dict)
    instances: tuple[Instance, ...] = ()


class ServiceSummary(_Wire):
    """One line of a service list."""

    name: str
    group_name: str
    instance_count: int
    healthy_instance_count: int


class ServiceList(_Wire):
    namespace: str
    services: list[ServiceSummary]


class Config(_Wire):
    """A configuration as Nacos config returns it."""

    data_id: str
    group: str = DEFAULT_GROUP
    namespace: str = DEFAULT_NAMESPACE
    type: str = "text"
    """Content format: yaml, properties, json or text."""
    content: str
    md5: str = ""
    """MD5 of the content, as Nacos reports it (filled in from the content)."""

    @model_validator(mode="before")
    @classmethod
    def _fill_md5(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("md5") and isinstance(data.get("content"), str):
            digest = hashlib.md5(data["content"].encode(), usedforsecurity=False).hexdigest()
            return {**data, "md5": digest}
        return data


class ConfigSummary(_Wire):
    """One line of a config list."""

    data_id: str
    group: str
    type: str


class ConfigList(_Wire):
    namespace: str
    configs: list[ConfigSummary]


class NacosNotFoundError(LookupError):
    """A namespace, service or config that the catalog does not hold."""

    def __init__(self, *, kind: str, name: str, namespace: str, known: Sequence[str]) -> None:
        self.kind = kind
        self.name = name
        self.namespace = namespace
        self.known = tuple(known)
        where = "" if kind == "namespace" else f" in namespace {namespace!r}"
        listed = ", ".join(self.known) or "none"
        super().__init__(f"{kind} {name!r} not found{where}; known {kind}s: {listed}")


@dataclass(frozen=True)
class NacosCatalog:
    """Nacos namespaces, services and configs, held in memory."""

    namespaces: tuple[str, ...]
    services: tuple[Service, ...] = ()
    configs: tuple[Config, ...] = ()

    def __post_init__(self) -> None:
        for ns in {s.namespace for s in self.services} | {c.namespace for c in self.configs}:
            if ns not in self.namespaces:
                raise ValueError(f"namespace {ns!r} is used but not declared")

    def _namespace(self, namespace: str) -> str:
        if namespace not in self.namespaces:
            raise NacosNotFoundError(
                kind="namespace", name=namespace, namespace=namespace, known=self.namespaces
            )
        return namespace

    def list_services(self, namespace: str = DEFAULT_NAMESPACE) -> ServiceList:
        ns = self._namespace(namespace)
        return ServiceList(
            namespace=ns,
            services=[
                ServiceSummary(
                    name=s.name,
                    group_name=s.group_name,
                    instance_count=len(s.instances),
                    healthy_instance_count=sum(1 for i in s.instances if i.healthy),
                )
                for s in self.services
                if s.namespace == ns
            ],
        )

    def get_service(self, service_name: str, namespace: str = DEFAULT_NAMESPACE) -> Service:
        ns = self._namespace(namespace)
        here = [s for s in self.services if s.namespace == ns]
        for s in here:
            if s.name == service_name:
                return s
        raise NacosNotFoundError(
            kind="service", name=service_name, namespace=ns, known=[s.name for s in here]
        )

    def list_configs(self, namespace: str = DEFAULT_NAMESPACE) -> ConfigList:
        ns = self._namespace(namespace)
        return ConfigList(
            namespace=ns,
            configs=[
                ConfigSummary(data_id=c.data_id, group=c.group, type=c.type)
                for c in self.configs
                if c.namespace == ns
            ],
        )

    def get_config(
        self, data_id: str, group: str = DEFAULT_GROUP, namespace: str = DEFAULT_NAMESPACE
    ) -> Config:
        ns = self._namespace(namespace)
        here = [c for c in self.configs if c.namespace == ns]
        for c in here:
            if c.data_id == data_id and c.group == group:
                return c
        raise NacosNotFoundError(
            kind="config",
            name=f"{group}/{data_id}",
            namespace=ns,
            known=[f"{c.group}/{c.data_id}" for c in here],
        )

    @classmethod
    def example(cls) -> NacosCatalog:
        """The examples' data: namespaces public, dev and prod."""

        def inst(ip: str, port: int, **kw: object) -> Instance:
            return Instance.model_validate({"ip": ip, "port": port, **kw})

        services = (
            Service(
                name="order-service",
                metadata={"owner": "trade-team"},
                protect_threshold=0.5,
                instances=(
                    inst("10.0.1.11", 8080, metadata={"version": "1.4.2", "zone": "cn-hangzhou-h"}),
                    inst("10.0.1.12", 8080, metadata={"version": "1.4.2", "zone": "cn-hangzhou-i"}),
                    inst("10.0.1.13", 8080, healthy=False, metadata={"version": "1.4.1"}),
                ),
            ),
            Service(
                name="payment-service",
                metadata={"owner": "pay-team"},
                instances=(
                    inst("10.0.2.21", 9090, weight=2.0, metadata={"version": "2.0.0"}),
                    inst("10.0.2.22", 9090, metadata={"version": "2.0.0"}),
                ),
            ),
            Service(
                name="user-service",
                instances=(inst("10.0.3.31", 8081, metadata={"version": "3.1.0"}),),
            ),
            Service(
                name="mse-gateway",
                group_name="GATEWAY_GROUP",
                instances=(
                    inst("10.0.9.1", 80, ephemeral=False, cluster_name="gw-cluster"),
                    inst("10.0.9.2", 80, ephemeral=False, cluster_name="gw-cluster"),
                ),
            ),
            Service(
                name="order-service",
                namespace="dev",
                instances=(inst("10.1.1.11", 8080, metadata={"version": "1.5.0-SNAPSHOT"}),),
            ),
            Service(
                name="user-service",
                namespace="dev",
                instances=(inst("10.1.3.31", 8081, healthy=False),),
            ),
            Service(
                name="order-service",
                namespace="prod",
                protect_threshold=0.6,
                instances=tuple(
                    inst(f"10.2.1.{n}", 8080, cluster_name="prod-a", metadata={"version": "1.4.2"})
                    for n in range(11, 15)
                ),
            ),
            Service(
                name="payment-service",
                namespace="prod",
                instances=(
                    inst("10.2.2.21", 9090, cluster_name="prod-a"),
                    inst("10.2.2.22", 9090, cluster_name="prod-b"),
                ),
            ),
        )
        configs = (
            Config(
                data_id="order-service.yaml",
                type="yaml",
                content=(
                    "server:\n  port: 8080\n"
                    "order:\n  timeout-ms: 3000\n  max-items: 50\n"
                    "feature:\n  new-checkout: false\n"
                ),
            ),
            Config(
                data_id="payment-service.properties",
                type="properties",
                content="payment.retry.max=3\npayment.retry.backoff-ms=200\npayment.currency=CNY\n",
            ),
            Config(
                data_id="gateway-routes.json",
                group="GATEWAY_GROUP",
                type="json",
                content=(
                    '{"routes": [{"path": "/api/orders/**", "service": "order-service"}, '
                    '{"path": "/api/pay/**", "service": "payment-service"}]}'
                ),
            ),
            Config(
                data_id="order-service.yaml",
                namespace="dev",
                type="yaml",
                content="server:\n  port: 8080\norder:\n  timeout-ms: 10000\nfeature:\n"
                "  new-checkout: true\n",
            ),
            Config(
                data_id="order-service.yaml",
                namespace="prod",
                type="yaml",
                content="server:\n  port: 8080\norder:\n  timeout-ms: 2000\n  max-items: 50\n",
            ),
            Config(
                data_id="payment-service.properties",
                namespace="prod",
                type="properties",
                content="payment.retry.max=5\npayment.retry.backoff-ms=500\npayment.currency=CNY\n",
            ),
        )
        return cls(namespaces=("public", "dev", "prod"), services=services, configs=configs)


_Namespace = Annotated[
    str, Field(description="Nacos namespace id: public (the default), dev or prod.")
]


def create_server(catalog: NacosCatalog | None = None) -> MCPServer:
    """The MCP server over ``catalog`` (default: :meth:`NacosCatalog.example`)."""
    data = catalog or NacosCatalog.example()
    server = MCPServer(
        "nacos-mcp-tools",
        title="Nacos tools",
        description="Nacos service discovery and configuration (example data)",
        version="1.0.0",
    )

    @server.tool()
    def list_services(namespace: _Namespace = DEFAULT_NAMESPACE) -> ServiceList:
        """List the services registered in a Nacos namespace, with instance counts."""
        try:
            return data.list_services(namespace)
        except NacosNotFoundError as e:
            raise ToolError(str(e)) from e

    @server.tool()
    def get_service(
        service_name: Annotated[str, Field(description="Service name, e.g. order-service.")],
        namespace: _Namespace = DEFAULT_NAMESPACE,
    ) -> Service:
        """Get one service of a Nacos namespace with its instances (ip, port, health)."""
        try:
            return data.get_service(service_name, namespace)
        except NacosNotFoundError as e:
            raise ToolError(str(e)) from e

    @server.tool()
    def list_configs(namespace: _Namespace = DEFAULT_NAMESPACE) -> ConfigList:
        """List the configurations (dataId, group, type) of a Nacos namespace."""
        try:
            return data.list_configs(namespace)
        except NacosNotFoundError as e:
            raise ToolError(str(e)) from e

    @server.tool()
    def get_config(
        data_id: Annotated[str, Field(description="Config dataId, e.g. order-service.yaml.")],
        group: Annotated[str, Field(description="Config group.")] = DEFAULT_GROUP,
        namespace: _Namespace = DEFAULT_NAMESPACE,
    ) -> Config:
        """Get one Nacos configuration's content by dataId and group."""
        try:
            return data.get_config(data_id, group, namespace)
        except NacosNotFoundError as e:
            raise ToolError(str(e)) from e

    return server


async def _serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        app = create_server().streamable_http_app(host=host)
        await serve_http(app, host=host, port=port, stop=stop, grace=2.0)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the Nacos tools over streamable HTTP until SIGTERM; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m examples.mcp_servers.nacos_tools", description=__doc__.split("\n")[0]
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    configure_logging(level=str(args.log_level).upper())
    try:
        asyncio.run(_serve(args.host, args.port))
    except OSError as e:
        logger.error("cannot start nacos-mcp-tools: %s", e)
        return EXIT_FAILED
    except Exception:
        logger.exception("nacos-mcp-tools failed")
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
