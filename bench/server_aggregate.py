"""Benchmark 2: the server's decode and aggregate of n scaled-sign frames (g_hat += (1/n) sum_i C_i,
MarkovMean.receive_all) against n clones of one vector, interleaved in one process.

    python bench/server_aggregate.py [--reps 15] [--workers 4 20] [--dtype float32]
"""

from __future__ import annotations

import torch

from common import micro_args, SIZES, interleaved, ms, publish, table

from cdmpi.compress import ScaledSign
from cdmpi.markov import MarkovMean, MarkovSequence


def main() -> None:
    args, dtype = micro_args(__doc__, 15, add=lambda p: p.add_argument("--workers", type=int, nargs="+", default=[4, 20]))
    rows = []
    for n in args.workers:
        for label, d in SIZES.items():
            compressor = ScaledSign(d)
            frames = torch.zeros(n, compressor.frame_nbytes, dtype=torch.uint8)
            for i in range(n):  # real frames: C(g_i) of random gradients
                compressor.encode(torch.randn(d, dtype=dtype), frames[i])
            mean = MarkovMean(compressor, n, dtype, "cpu", seed=0)
            down = MarkovSequence(compressor, dtype, "cpu", seed=0, stream=0)
            down_frame = compressor.new_frame()
            x = torch.randn(d, dtype=dtype)
            copy = torch.empty_like(x)

            def clones():
                for _ in range(n):
                    x.clone()

            def copies():
                for _ in range(n):
                    copy.copy_(x)

            t = interleaved({"clone": clones, "copy_": copies, "aggregate": lambda: mean.receive_all(frames),
                             "recompress": lambda: down.push(mean.value, down_frame)}, args.reps)
            rows.append([n, label, ms(t["clone"]), ms(t["copy_"]), ms(t["aggregate"]),
                         f"{t['aggregate'] / t['clone']:.2f}", f"{t['aggregate'] / t['copy_']:.2f}",
                         ms(t["recompress"])])
    text = table(["n", "d", "n clones ms", "n copy_ ms", "decode+aggregate ms", "aggregate / clones",
                  "aggregate / copy_", "server re-compress (Markov push) ms"], rows)
    publish(f"2_server_aggregate_{args.dtype}", f"2. Server decode and aggregate of n frames ({args.dtype})", text,
            "decode+aggregate = MarkovMean.receive_all: for each chunk of wire.CHUNK coordinates, numba's loop "
            "adds +-scale_i of each frame in worker order (the torch path without numba: the 256 x 8 table of "
            "+-1 and addcmul_), then torch adds alpha times the chunk; no dense vector per frame is made. Target <= 1.0x one clone per frame. The last column is the rest of the "
            "server's step (C(g_hat - g_tilde) and g_tilde's update), for scale.")


if __name__ == "__main__":
    main()
