"""What the value checks of ``mgll_loss`` cost (docs/errors.rst, "The cost of validation").

The structure checks (types, shapes, dtypes, devices) read metadata only and always run; the
value checks (finite features, non-zero norms, a positive finite logit scale, non-negative
labels and targets) read the data and end in one host synchronisation.  This script times the
loss with ``validate=True`` and ``validate=False`` on the same inputs, interleaved so that
machine load affects both alike, and the value checks alone.

Usage::

    python benchmarks/validation_overhead.py                  # CPU, N=256 and N=4096, CPU time
    python benchmarks/validation_overhead.py --device cuda --sizes 256 4096 16384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mgll
from mgll import _validation as v


def make_inputs(n: int, d: int, g: int, device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_(True)
    texts = [
        torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(g)
    ]
    ids = torch.randint(0, max(1, n // 4), (n,), generator=gen)
    labels = [(ids // (2**j)).to(device) for j in range(g)]  # coarser at each granularity
    scale = torch.tensor(20.0, device=device, requires_grad=True)
    return image, texts, scale, labels


def timed(fn, device: str, clock) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = clock()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def measure(n: int, args) -> dict[str, float]:
    image, texts, scale, labels = make_inputs(
        n, args.dim, args.granularities, args.device, args.dtype
    )

    def loss(validate: bool, backward: bool):
        def run():
            out = mgll.mgll_loss(
                image, texts, scale, labels=labels, backend=args.backend, validate=validate
            )
            if backward:
                out.backward()

        return run

    def checks():
        texts_ = v.check_features(image, texts)
        mode, values = v.check_labels_or_targets(labels, None, image, texts_)
        v.check_values(v.batch_conditions(image, texts_, scale, None, mode, values, True))

    reps = args.reps or (30 if n <= 1024 else 5)
    cases = {
        "fwd on": loss(True, False),
        "fwd off": loss(False, False),
        "fwd+bwd on": loss(True, True),
        "fwd+bwd off": loss(False, True),
        "checks": checks,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(reps):  # interleaved, so load drifts affect every case alike
        for name, fn in cases.items():
            times[name].append(timed(fn, args.device, args.clock))
    return {k: statistics.median(t) * 1e3 for k, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--granularities", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default: by size)")
    parser.add_argument(
        "--clock",
        choices=["thread", "wall"],
        default=None,
        help="thread: CPU time of this thread with one torch thread, robust to a busy machine "
        "(default on CPU); wall: elapsed time (default on CUDA)",
    )
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    args.clock = args.clock or ("thread" if args.device == "cpu" else "wall")
    if args.clock == "thread":
        torch.set_num_threads(1)  # all the work then runs on, and is charged to, this thread
    args.clock = time.thread_time if args.clock == "thread" else time.perf_counter
    print(
        f"device={args.device} dtype={args.dtype} backend={args.backend} D={args.dim} "
        f"G={args.granularities} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"clock={args.clock.__name__}"
    )
    print("median ms      fwd on   fwd off  overhead | fwd+bwd on  fwd+bwd off  overhead | checks")
    for n in args.sizes:
        t = measure(n, args)
        fwd = t["fwd on"] - t["fwd off"]
        both = t["fwd+bwd on"] - t["fwd+bwd off"]
        print(
            f"N={n:<6d} {t['fwd on']:9.2f} {t['fwd off']:9.2f} {fwd:+7.2f} ({fwd / t['fwd off']:+.1%})"
            f" | {t['fwd+bwd on']:10.2f} {t['fwd+bwd off']:11.2f} {both:+7.2f} "
            f"({both / t['fwd+bwd off']:+.1%}) | {t['checks']:.3f}"
        )


if __name__ == "__main__":
    main()
