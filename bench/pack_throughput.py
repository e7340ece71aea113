"""Sign packing on the device against a device-to-device copy of the same fp32 vector."""

import sys

import torch

from cdmpi import compress, wire


def timed(fn, repeats=20) -> float:
    """Mean seconds per call after warm-up, timed with CUDA events."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def main(device="cuda") -> None:
    for d in (11_173_962, 1 << 26):  # ResNet-18's d, and 64 Mi coordinates
        x = torch.randn(d, device=device)
        packed = torch.empty(wire.sign_nbytes(d), dtype=torch.uint8, device=device)
        copy = torch.empty_like(x)
        frame = compress.make("scaled_sign", d).new_frame(device)
        t_pack = timed(lambda: wire.pack_signs(x, packed))
        t_encode = timed(lambda: compress.make("scaled_sign", d).encode(x, frame))
        t_copy = timed(lambda: copy.copy_(x))
        gb = 4 * d / 1e9  # fp32 bytes read
        print(f"d={d}: pack_signs {t_pack * 1e3:.3f} ms ({gb / t_pack:.0f} GB/s of fp32 input), "
              f"scaled_sign encode {t_encode * 1e3:.3f} ms, d2d copy of the fp32 vector {t_copy * 1e3:.3f} ms "
              f"({2 * gb / t_copy:.0f} GB/s read+write); pack/copy time ratio {t_pack / t_copy:.2f}; "
              f"bytes to move after packing {packed.numel()} vs {4 * d} unpacked", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
