"""Benchmark 3: a CD-Adam worker's optimizer step (encode: C(g - g_hat) and g_hat's update; update:
decode the server's frame into g_tilde and the AMSGrad step) against torch.optim.Adam(amsgrad=True).step()
on the same d, interleaved in one process.

    python bench/worker_step.py [--reps 15] [--dtype float32]
"""

from __future__ import annotations

import torch

from common import micro_args, SIZES, interleaved, ms, publish, table

from cdmpi.algorithms import CDAdamWorker, Setting
from cdmpi.compress import ScaledSign
from cdmpi.config import OptimConfig


def main() -> None:
    args, dtype = micro_args(__doc__, 15)
    rows = []
    for label, d in SIZES.items():
        compressor = ScaledSign(d)
        setting = Setting(d, 4, compressor, compressor, OptimConfig(), dtype, 0)
        worker = CDAdamWorker(setting, 0)
        params = torch.randn(d, dtype=dtype)
        grad = torch.randn(d, dtype=dtype)
        up, down = compressor.new_frame(), compressor.new_frame()
        compressor.encode(torch.randn(d, dtype=dtype), down)  # a real server frame

        torch_params = torch.nn.Parameter(params.clone())
        torch_params.grad = grad.clone()
        adam = torch.optim.Adam([torch_params], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, amsgrad=True)

        def cdadam_step():
            worker.encode(grad, up)
            worker.update(params, down, 1e-3)

        t = interleaved({"adam": adam.step, "encode": lambda: worker.encode(grad, up),
                         "update": lambda: worker.update(params, down, 1e-3), "step": cdadam_step}, args.reps)
        rows.append([label, ms(t["adam"]), ms(t["encode"]), ms(t["update"]), ms(t["step"]),
                     f"{t['step'] / t['adam']:.2f}"])
    text = table(["d", "torch Adam(amsgrad=True).step ms", "encode ms", "update ms", "CD-Adam worker step ms",
                  "step / Adam"], rows)
    publish(f"3_worker_step_{args.dtype}", f"3. A worker's optimizer step ({args.dtype})", text,
            "CD-Adam worker step = encode (C(g - g_hat), pack, g_hat += C) + update (decode the server frame, "
            "g_tilde += c, AMSGrad on g_tilde). torch's Adam uses its default implementation for one CPU "
            "tensor (foreach). Target <= 2.0x.")


if __name__ == "__main__":
    main()
