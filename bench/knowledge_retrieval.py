"""Knowledge-base retrieval benchmark, side by side in one run.

* Chroma (embedded, on disk, HNSW cosine with its defaults), searched through the engine's
  own :class:`engine.knowledge.store.ChromaVectorStore` (each query runs in a worker
  thread, as in a turn), against an exact brute-force numpy scan (float32 matrix product
  + ``argpartition``) of the very same vectors.
* At 10k and 100k chunks (the collection grows from one size to the next): insert time,
  query latency p50/p90/p99 (sequential queries, top-k), and recall@k of Chroma against
  the exact scan (the share of the exact top-k ids that Chroma returns; and tie-aware:
  the share of Chroma's hits scoring at least the exact k-th score, since hashed vectors
  often tie). ``--ef-search`` raises HNSW's search breadth to show the recall/latency
  trade-off.

Vectors (``--vectors``): ``hashed`` (default) -- the scripted model server's embeddings
(signed hashed bag of words, 256 dimensions, unit length) of synthetic chunks of 40 words
drawn from a 5,000-word Zipf-like vocabulary; queries are 12 words taken from a random
chunk, so each has true neighbours, as a question has. ``random`` -- Gaussian vectors
normalised to unit length, queries likewise (no structure: the hardest case for an
approximate index). The embedding model itself is not timed.

Run: ``uv run python bench/knowledge_retrieval.py [--sizes 10000 100000] [--queries 300]``
(``--smoke``: 200 and 400 chunks, 20 queries -- proves the bench runs, no figures).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._load import dump, percentile
from engine.knowledge.store import ChromaVectorStore, StoredChunk
from localfleet.modelserver.embeddings import embed_text
from specmesh.spec.models import VectorStoreSpec

DIM = 256


def _vocabulary(rng: np.random.Generator, size: int = 5000) -> tuple[list[str], np.ndarray]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(size)})
    weights = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    return words, weights / weights.sum()


class Corpus:
    """Chunks and queries, as texts (hashed) or directly as vectors (random)."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind = kind
        self.rng = np.random.default_rng(seed)
        self.words, self.p = _vocabulary(self.rng)
        self.texts: list[str] = []

    def chunks(self, n: int) -> tuple[list[str], np.ndarray]:
        if self.kind == "random":
            v = self.rng.standard_normal((n, DIM)).astype(np.float32)
            texts = [f"random chunk {len(self.texts) + i}" for i in range(n)]
        else:
            picks = self.rng.choice(len(self.words), size=(n, 40), p=self.p)
            texts = [" ".join(self.words[j] for j in row) for row in picks]
            v = np.array([embed_text(t, dimensions=DIM) for t in texts], dtype=np.float32)
        self.texts += texts
        return texts, v / np.linalg.norm(v, axis=1, keepdims=True)

    def queries(self, n: int) -> np.ndarray:
        if self.kind == "random":
            q = self.rng.standard_normal((n, DIM)).astype(np.float32)
        else:
            out = []
            for i in self.rng.integers(0, len(self.texts), size=n):
                words = self.texts[int(i)].split()
                chosen = self.rng.choice(len(words), size=12, replace=False)
                out.append(embed_text(" ".join(words[j] for j in chosen), dimensions=DIM))
            q = np.array(out, dtype=np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True)


def _exact(matrix: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The exact top-k rows and the k-th best score."""
    scores = matrix @ q
    top = np.argpartition(-scores, k)[:k]
    top = top[np.argsort(-scores[top])]
    return top, float(scores[top[-1]])


def _summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
    }


async def _run(args: argparse.Namespace) -> dict[str, object]:
    corpus = Corpus(args.vectors, args.seed)
    folder = Path(tempfile.mkdtemp(prefix="specmesh-bench-kb-"))
    store = await ChromaVectorStore.open(
        VectorStoreSpec(type="chroma", collection="bench", address=str(folder)), data_dir=folder
    )
    if args.ef_search:
        # not a spec setting: the bench reaches the collection to show the trade-off
        store._collection.modify(configuration={"hnsw": {"ef_search": args.ef_search}})
    matrix = np.zeros((0, DIM), dtype=np.float32)
    results: dict[str, object] = {}
    for size in sorted(args.sizes):
        add = size - matrix.shape[0]
        t0 = time.perf_counter()
        texts, vectors = corpus.chunks(add)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, add, args.batch):
            base = matrix.shape[0] + i
            await store.upsert(
                [
                    StoredChunk(
                        id=str(base + j),
                        vector=vectors[i + j].tolist(),
                        text=texts[i + j],
                        metadata={"source": f"doc-{(base + j) // 10}", "position": (base + j) % 10},
                    )
                    for j in range(min(args.batch, add - i))
                ]
            )
        inserted = time.perf_counter() - t0
        matrix = np.vstack([matrix, vectors])
        assert await store.count() == size

        queries = corpus.queries(args.queries)
        for q in queries[:10]:  # warm both paths
            await store.query(q.tolist(), k=args.k)
            _exact(matrix, q, args.k)
        chroma_ms: list[float] = []
        numpy_ms: list[float] = []
        recalls: list[float] = []
        tie_recalls: list[float] = []
        for q in queries:
            ql = q.tolist()
            t0 = time.perf_counter()
            hits = await store.query(ql, k=args.k)
            chroma_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            exact, kth = _exact(matrix, q, args.k)
            numpy_ms.append((time.perf_counter() - t0) * 1000)
            recalls.append(len({h.id for h in hits} & {str(i) for i in exact}) / args.k)
            # a hit scoring as well as the exact k-th one is as good (ties are common)
            tie_recalls.append(sum(h.score >= kth - 1e-5 for h in hits) / args.k)
        results[f"{size}_chunks"] = {
            "chroma_hnsw": {
                **_summary(chroma_ms),
                f"recall_at_{args.k}": round(float(np.mean(recalls)), 4),
                "min_recall": round(float(np.min(recalls)), 4),
                f"tie_aware_recall_at_{args.k}": round(float(np.mean(tie_recalls)), 4),
                "insert_seconds": round(inserted, 2),
                "inserted": add,
                "inserts_per_second": round(add / inserted, 1),
            },
            "numpy_exact_scan": _summary(numpy_ms),
            "vector_generation_seconds": round(made, 2),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5000, help="chunks per upsert")
    parser.add_argument("--vectors", choices=["hashed", "random"], default="hashed")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--ef-search", type=int, default=0, help="HNSW ef_search (default: Chroma's, 100)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: proves the bench runs, no figures"
    )
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.queries, args.batch = [200, 400], 20, 100
    results = asyncio.run(_run(args))
    dump(
        "knowledge_retrieval",
        {
            "vectors": f"{args.vectors}, {DIM} dims, unit length",
            "smoke": args.smoke,
            "k": args.k,
            "queries": args.queries,
            "chroma": "embedded PersistentClient, HNSW cosine, M 16, ef_construction 100, "
            f"ef_search {args.ef_search or 100}",
            "numpy": f"float32 matrix @ query, argpartition; numpy {np.__version__}",
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
