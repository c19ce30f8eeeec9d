"""CKA speed and memory: the streaming minibatch estimator next to the full-Gram formula, in one run.

Representations are generated chunk by chunk (x ~ N(0, 1), y = tanh(x W) + noise), so the minibatch
estimator never holds more than one batch. The full-Gram (n x n) linear CKA runs where it fits in
memory (n = 10k: 800 MB per Gram matrix), the feature-space formula (d x d) everywhere.

    python benchmarks/bench_cka.py [--n 10000 --n 100000] [--d 512 --d 2048] [--batch 1024]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from histotransfer import cka


def chunks(n: int, d: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, d)) / np.sqrt(d)
    for _ in range(n // batch):
        x = rng.normal(size=(batch, d))
        yield x, np.tanh(x @ w) + 0.5 * rng.normal(size=(batch, d))


def measure(fn):
    tracemalloc.start()
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return value, seconds, peak / 2**20


def minibatch(n, d, batch):
    estimator = cka.MinibatchCKA(1, 1)
    for x, y in chunks(n, d, batch):
        estimator.update([x], [y])
    return float(estimator.value()[0, 0])


def full(n, d, batch, gram: bool):
    x, y = map(np.concatenate, zip(*chunks(n, d, batch), strict=True))
    if not gram:
        return cka.linear(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T  # noqa: E741  (n x n Gram matrices)
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append")
    parser.add_argument("--d", type=int, action="append")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--max-gram-n", type=int, default=10_000, help="largest n for the n x n formula")
    args = parser.parse_args()
    print(f"{'n':>8}{'d':>6}  {'method':<30}{'CKA':>8}{'seconds':>10}{'peak MiB':>10}")
    for d in args.d or [512, 2048]:
        for n in args.n or [10_000, 100_000]:
            rows = [("minibatch (unbiased HSIC)", measure(lambda n=n, d=d: minibatch(n, d, args.batch)))]
            rows.append(
                ("full, feature space (d x d)", measure(lambda n=n, d=d: full(n, d, args.batch, False)))
            )
            if n <= args.max_gram_n:
                rows.append(("full, Gram (n x n)", measure(lambda n=n, d=d: full(n, d, args.batch, True))))
            for name, (value, seconds, peak) in rows:
                print(f"{n:>8}{d:>6}  {name:<30}{value:>8.4f}{seconds:>10.2f}{peak:>10.0f}")


if __name__ == "__main__":
    main()
