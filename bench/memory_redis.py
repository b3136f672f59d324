"""Memory read/write latency on Redis: through the sidecar's Redis proxy vs direct, side by side.

The engine's real memory class (:class:`engine.memory.RedisConversationMemory`) runs the same
operations against the same redis-server (with a password):

* ``direct``: the client holds the password and talks to redis-server itself;
* ``proxy``: the client connects without a password to :class:`sidecar.redisproxy.RedisProxy`
  running in its own process (as the sidecar does), which authenticated each upstream
  connection with the password read from OpenBao through the ``CredentialResolver``.

Operations: ``write`` = append one exchange (user + assistant turns: RPUSH, LTRIM, EXPIRE in
one MULTI); ``read`` = the whole conversation (LRANGE of ``--turns`` turns, ~200 bytes each).
Closed loop, one operation at a time (``concurrency 1``) and ``--concurrency`` at a time;
p50/p99 in milliseconds. Real redis-server and OpenBao from ``localfleet.installer``. Run:
``uv run python bench/memory_redis.py [--ops 2000] [--turns 20] [--concurrency 16]``
(``--smoke``: 50 ops, concurrency 2 -- proves the bench runs, no figures).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import dump, percentile
from engine.memory import RedisConversationMemory
from localfleet.installer import LocalServices, RedisProcess
from specmesh.ports import free_port
from specmesh.secrets import VaultRef
from specmesh.vault import VaultClient

PASSWORD = "bench-redis-pw-91c2"
REF = VaultRef(mount="secret", path="specmesh/agents/bench/memory/password", field="value")
TURN_TEXT = "word " * 36  # ~200 bytes of JSON per turn


def _proxy_process(
    bao_addr: str, bao_token: str, redis_address: str, port: int, ready: Any
) -> None:
    """The proxy in its own process, as in the sidecar (its own event loop and GIL)."""
    from sidecar.credentials import CredentialResolver
    from sidecar.redisproxy import RedisProxy
    from sidecar.state import SnapshotHolder
    from specmesh.snapshot import PromptBundle, ResolvedSnapshot
    from specmesh.spec.models import AgentSpec, PromptEntry

    async def serve() -> None:
        spec = AgentSpec.model_validate(
            {
                "base": {"description": "bench", "promptKey": "p"},
                "model": {"model": "m"},
                "memory": {
                    "storageType": "redis",
                    "address": redis_address,
                    "credentials": {"password": str(REF)},
                    "ttlSeconds": 3600,
                },
            }
        )
        holder = SnapshotHolder()
        await holder.set(
            ResolvedSnapshot(
                agent_name="bench",
                revision=1,
                track="stable",
                spec=spec,
                prompt=PromptBundle(
                    versions={"1": PromptEntry(prompt_key="p", version="1", template="t")}
                ),
            ),
            etcd_revision=1,
        )
        vault = VaultClient(address=bao_addr, token=bao_token)
        try:
            async with (
                CredentialResolver(source=vault, ttl=300) as credentials,
                RedisProxy(snapshots=holder, credentials=credentials, port=port),
            ):
                ready.set()
                await asyncio.Event().wait()
        finally:
            await vault.close()

    asyncio.run(serve())


async def _measure(
    memory: RedisConversationMemory, *, ops: int, turns: int, concurrency: int
) -> dict[str, Any]:
    exchange = [
        {"role": "user", "content": TURN_TEXT},
        {"role": "assistant", "content": TURN_TEXT},
    ]
    # fill the read conversation
    await memory.delete("read")
    for _ in range(turns // 2):
        await memory.append("read", exchange)
    # open ``concurrency`` pooled connections up front (each costs the proxy an AUTH)
    await asyncio.gather(*(memory.get("read") for _ in range(concurrency * 4)))

    async def timed(op: str, i: int) -> float:
        start = time.perf_counter()
        if op == "write":
            await memory.append(f"write-{i % 100}", exchange)
        else:
            await memory.get("read")
        return (time.perf_counter() - start) * 1000

    out: dict[str, Any] = {}
    for op in ("write", "read"):
        serial = [await timed(op, i) for i in range(ops)]
        sem = asyncio.Semaphore(concurrency)

        async def bounded(i: int, op: str = op, sem: asyncio.Semaphore = sem) -> float:
            async with sem:
                return await timed(op, i)

        started = time.perf_counter()
        parallel = await asyncio.gather(*(bounded(i) for i in range(ops)))
        elapsed = time.perf_counter() - started
        out[op] = {
            "concurrency_1": {
                "p50_ms": round(percentile(serial, 50), 3),
                "p99_ms": round(percentile(serial, 99), 3),
            },
            f"concurrency_{concurrency}": {
                "p50_ms": round(percentile(list(parallel), 50), 3),
                "p99_ms": round(percentile(list(parallel), 99), 3),
                "ops_per_s": round(ops / elapsed),
            },
        }
    for i in range(100):
        await memory.delete(f"write-{i}")
    await memory.delete("read")
    return out


async def _run(args: argparse.Namespace, redis_proc: RedisProcess, proxy_port: int) -> dict:
    direct = RedisConversationMemory(
        client=aioredis.Redis(
            host=redis_proc.host, port=redis_proc.port, password=PASSWORD, decode_responses=True
        ),
        agent_name="bench-direct",
        ttl_seconds=3600,
    )
    proxied = RedisConversationMemory.connect(
        proxy=f"127.0.0.1:{proxy_port}", agent_name="bench-proxy", ttl_seconds=3600
    )
    try:
        kw = {"ops": args.ops, "turns": args.turns, "concurrency": args.concurrency}
        results = {
            "direct": await _measure(direct, **kw),
            "proxy": await _measure(proxied, **kw),
        }
    finally:
        await direct.aclose()
        await proxied.aclose()
    added: dict[str, Any] = {}
    for op in ("write", "read"):
        d, p = results["direct"][op]["concurrency_1"], results["proxy"][op]["concurrency_1"]
        added[op] = {k: round(p[k] - d[k], 3) for k in ("p50_ms", "p99_ms")}
    results["proxy_adds_concurrency_1"] = added
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: proves the bench runs, no figures"
    )
    args = parser.parse_args()
    if args.smoke:
        args.ops, args.turns, args.concurrency = 50, 2, 2
    with tempfile.TemporaryDirectory(prefix="specmesh-bench-mem-") as tmp:
        home = Path(tmp)
        services = LocalServices(home=home / "services")
        redis_proc = RedisProcess(data_dir=home / "redis", port=free_port(), password=PASSWORD)
        services.start()
        redis_proc.start()
        proxy: mp.process.BaseProcess | None = None
        try:

            async def write_secret() -> None:
                vault = VaultClient(address=services.bao.address, token=services.bao.root_token)
                try:
                    await vault.write(REF, PASSWORD)
                finally:
                    await vault.close()

            asyncio.run(write_secret())
            ctx = mp.get_context("spawn")
            ready = ctx.Event()
            proxy_port = free_port()
            proxy = ctx.Process(
                target=_proxy_process,
                args=(
                    services.bao.address,
                    services.bao.root_token,
                    redis_proc.address,
                    proxy_port,
                    ready,
                ),
                daemon=True,
            )
            proxy.start()
            if not ready.wait(60):
                raise RuntimeError("the Redis proxy did not start")
            results = asyncio.run(_run(args, redis_proc, proxy_port))
            dump(
                "memory_redis",
                {
                    "smoke": args.smoke,
                    "ops": args.ops,
                    "turns_read": args.turns,
                    "turn_bytes": len(TURN_TEXT) + 40,
                    "results": results,
                },
            )
            return 0
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.join(10)
            redis_proc.stop()
            services.stop()


if __name__ == "__main__":
    sys.exit(main())
