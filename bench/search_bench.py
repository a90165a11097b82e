"""Gallery search at scale: exact (flat) vs IVF (flat / SQ8 / refined) vs HNSW, on FAISS, single process, no Ray.

    python bench/search_bench.py --n 1000000 --dim 512                       # clustered synthetic vectors
    python bench/search_bench.py --n 1000000 --real-index INDEX_DIR          # real CMAN embeddings + noise

Per index: build time (train + add), memory (RSS growth of this process while the index is built, the index's own
size written to disk, and bytes per item: codes + full vectors for `ivf_refine`), queries/s at batch 1 and 32 and
both relative to the exact search's in the same run, and recall@10 against exact search (the flat index's answers
for the same queries). `ivf_refine` is `cman.index`'s kind of that name: IVF over compressed codes (sq8, or 4-bit
fast-scan PQ) whose `k_factor * 10` candidates faiss' IndexRefineFlat re-scores exactly. Writes JSON (stdout and
`--out`) and, unless `--no-plot`, a recall-vs-QPS plot next to it. The cost of online adds is measured by
bench/gallery_store_bench.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cman.index import TRAIN_POINTS_PER_LIST, auto_params, refine_factory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x


def clustered(n: int, dim: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """`n` unit vectors around `n_clusters` random unit centres (Gaussian spread per coordinate / sqrt(dim))."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[rng.integers(0, n_clusters, stop - start)]
        block += rng.standard_normal(block.shape, dtype=np.float32) * (spread / np.sqrt(dim))
        out[start:stop] = normalise(block)
    return out


def replicated(base: np.ndarray, n: int, spread: float, seed: int) -> np.ndarray:
    """`n` noisy copies of the real embeddings in `base` (round-robin), re-normalised."""
    rng = np.random.default_rng(seed)
    dim = base.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = base[np.arange(start, stop) % len(base)].copy()
        block += rng.standard_normal(block.shape, dtype=np.float32) * (spread / np.sqrt(dim))
        out[start:stop] = normalise(block)
    return out


def real_vectors(index_dir: str) -> np.ndarray:
    """Every vector of every modality of an index directory written by `cman index` (real CMAN embeddings)."""
    from cman.gallery_mirror import open_gallery

    gallery = open_gallery(index_dir)
    return np.concatenate([g.vectors() for g in gallery.values()]).astype(np.float32)


def qps(index: faiss.Index, queries: np.ndarray, k: int, batch: int, budget_s: float) -> float:
    """Queries per second at `batch` queries per call, over at most `budget_s` seconds (at least one call)."""
    done, start = 0, time.perf_counter()
    while done < len(queries):
        index.search(queries[done : done + batch], k)
        done += batch
        if time.perf_counter() - start > budget_s:
            break
    return min(done, len(queries)) / (time.perf_counter() - start)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def index_size(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(dir=RESULTS) as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


SEARCH_SETTINGS = ("nprobe", "ef_search", "k_factor")  # lists in a spec: every combination is measured


def build(spec: dict, data: np.ndarray) -> tuple[faiss.Index, float, int]:
    """The faiss index for `spec`, its build seconds and the RSS growth while building."""
    gc.collect()
    rss0, start = rss_bytes(), time.perf_counter()
    dim, kind = data.shape[1], spec["kind"]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec["ef_construction"]
    else:
        factory = {"ivf_sq8": f"IVF{spec['nlist']},SQ8", "ivf_flat": f"IVF{spec['nlist']},Flat"}.get(kind)
        factory = factory or refine_factory(dim, spec["nlist"], spec["codes"])  # ivf_refine
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        most = spec["nlist"] * TRAIN_POINTS_PER_LIST  # 40 vectors per list, as cman.index trains ivf_refine
        sample = np.random.default_rng(0).choice(len(data), min(len(data), most), replace=False)
        index.train(data[np.sort(sample)])
    for start_row in range(0, len(data), 200_000):
        index.add(data[start_row : start_row + 200_000])
    return index, time.perf_counter() - start, rss_bytes() - rss0


def settings(spec: dict) -> list[dict[str, int]]:
    """Every combination of the spec's search-time settings (one empty dict for exact search)."""
    out: list[dict[str, int]] = [{}]
    for name in SEARCH_SETTINGS:
        out = [{**done, name: value} for done in out for value in spec.get(name, [None]) if value is not None] or out
    return out


def apply(index: faiss.Index, setting: dict[str, int]) -> None:
    if "ef_search" in setting:
        index.hnsw.efSearch = setting["ef_search"]
    if "k_factor" in setting:
        index.k_factor = setting["k_factor"]
    if "nprobe" in setting:
        faiss.extract_index_ivf(index).nprobe = setting["nprobe"]


def bytes_per_item(index: faiss.Index, size: int, n: int) -> dict[str, float]:
    """Memory per item: the whole index (written to disk) / n; for a refined index also its codes and vectors."""
    out = {"bytes_per_item": round(size / n, 1)}
    if isinstance(index, faiss.IndexRefine):
        ivf = faiss.extract_index_ivf(index.base_index)
        out["code_bytes"] = ivf.code_size + 8  # the PQ code and its id in the inverted list
        out["refine_bytes"] = faiss.downcast_index(index.refine_index).code_size  # the float32 vector
    return out


def run_dataset(name: str, data: np.ndarray, queries: np.ndarray, specs: list[dict], args) -> dict:
    k = 10
    rows, truth, exact = [], None, None
    for spec in specs:
        index, build_s, rss = build(spec, data)
        size = index_size(index)
        for setting in settings(spec):
            apply(index, setting)
            found = index.search(queries, k)[1]
            if truth is None:
                truth = found
            row = {
                "dataset": name,
                "index": spec["kind"],
                "params": {key: v for key, v in spec.items() if key != "kind" and key not in SEARCH_SETTINGS},
                **setting,
                "build_s": round(build_s, 2),
                "rss_growth_mb": round(rss / 2**20, 1),
                "index_mb": round(size / 2**20, 1),
                **bytes_per_item(index, size, len(data)),
                "recall_at_10": round(recall_at(found, truth), 4),
                "qps_batch1": round(qps(index, queries, k, 1, args.time_budget), 1),
                "qps_batch32": round(qps(index, queries, k, 32, args.time_budget), 1),
            }
            exact = exact or row  # the flat index comes first
            row["speedup_batch1"] = round(row["qps_batch1"] / exact["qps_batch1"], 2)
            row["speedup_batch32"] = round(row["qps_batch32"] / exact["qps_batch32"], 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del index
        gc.collect()
    return {"dataset": name, "n": len(data), "dim": data.shape[1], "queries": len(queries), "rows": rows}


def specs(n: int, args) -> list[dict]:
    """The index specs benchmarked (flat first: it is the exact reference)."""
    chosen = [spec for spec in default_specs(n, args) if spec["kind"] == "flat" or spec["kind"] in args.kinds]
    refine = next((spec for spec in chosen if spec["kind"] == "ivf_refine"), None)
    if refine is not None:  # one spec per --refine-codes value
        at = chosen.index(refine)
        chosen[at : at + 1] = [{**refine, "codes": codes} for codes in args.refine_codes]
    return chosen


def default_specs(n: int, args) -> list[dict]:
    nlist = args.nlist or int(max(16, min(1024, 2 ** round(np.log2(np.sqrt(n))))))  # 1M: 1024 lists of ~1000
    auto = auto_params(n, 0)  # ivf_refine: serve.index_kind auto's lists (1M: 4096) and nprobe (lists / 16)
    refine_nlist = args.refine_nlist or auto["nlist"]
    nprobe = args.refine_nprobe or [refine_nlist // 32, refine_nlist // 16, refine_nlist // 8]
    return [
        {"kind": "flat"},
        {"kind": "ivf_flat", "nlist": nlist, "nprobe": [8, 16, 32, 64, 128]},
        {"kind": "ivf_sq8", "nlist": nlist, "nprobe": [16, 32, 64, 128]},
        {"kind": "ivf_refine", "nlist": refine_nlist, "nprobe": nprobe, "k_factor": args.refine_k_factor},
        {"kind": "hnsw", "m": 16, "ef_construction": 40, "ef_search": [32, 64, 128, 256]},
    ]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for kind in dict.fromkeys(_label(r) for r in result["rows"]):
            rows = [r for r in result["rows"] if _label(r) == kind]
            ax.plot([r["recall_at_10"] for r in rows], [r["qps_batch1"] for r in rows], "o-", label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("queries/s (batch 1)")
        ax.set_title(f"{result['dataset']}: n={result['n']:,} dim={result['dim']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _label(row: dict) -> str:
    """A curve of the plot: the index kind (+ codes and k_factor for ivf_refine)."""
    if row["index"] != "ivf_refine":
        return row["index"]
    return f"ivf_refine {row['params']['codes']} k_factor {row['k_factor']:g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="gallery size")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (synthetic)")
    p.add_argument("--queries", type=int, default=500, help="query count (recall and QPS)")
    p.add_argument("--clusters", type=int, default=10000, help="synthetic: cluster count")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm around a cluster centre / real vector")
    p.add_argument("--real-index", help="index dir from `cman index`: benchmark its vectors replicated with noise")
    p.add_argument("--no-synthetic", action="store_true", help="only the --real-index set")
    p.add_argument(
        "--kinds", nargs="+", default=["ivf_flat", "ivf_sq8", "ivf_refine", "hnsw"], help="ANN indexes to run"
    )
    p.add_argument("--nlist", type=int, default=0, help="ivf_flat/ivf_sq8 lists (0: 2^round(log2 sqrt(n)), 16-1024)")
    p.add_argument("--refine-nlist", type=int, default=0, help="ivf_refine lists (0: cman.index.auto_params')")
    p.add_argument("--refine-codes", nargs="+", default=["sq8"], help="ivf_refine: codes (cman.index.REFINE_CODES)")
    p.add_argument("--refine-nprobe", nargs="+", type=int, help="ivf_refine: nprobe values (default lists/32, /16, /8)")
    p.add_argument("--refine-k-factor", nargs="+", type=float, default=[4, 8, 16], help="ivf_refine: k_factor values")
    p.add_argument("--time-budget", type=float, default=8.0, help="seconds per QPS measurement at most")
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    p.add_argument("--out", help="JSON path (default bench/results/search_<n>_<time>.json)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {_cpu_name()}",
        "faiss": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "load_avg_start": os.getloadavg(),
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    rng = np.random.default_rng(123)
    if not args.no_synthetic:
        data = clustered(args.n + args.queries, args.dim, args.clusters, args.spread, seed=0)
        queries, data = data[: args.queries].copy(), data[args.queries :]
        results.append(run_dataset("clustered synthetic", data, queries, specs(args.n, args), args))
        del data
    if args.real_index:
        base = real_vectors(args.real_index)
        data = replicated(base, args.n, args.spread, seed=1)
        queries = replicated(base[rng.permutation(len(base))], args.queries, args.spread, seed=2)
        name = f"real CMAN embeddings ({len(base)}) + noise"
        results.append(run_dataset(name, data, queries, specs(args.n, args), args))
    out = {**meta, "results": results}
    path = Path(args.out or RESULTS / f"search_{args.n}_{stamp}.json")
    if not args.no_plot and results:
        plot(results, path.with_suffix(".png"))
    out["load_avg_end"] = os.getloadavg()
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
