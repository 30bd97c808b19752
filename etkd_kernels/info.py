"""`python -m etkd_kernels.info`: what is built, and which backend can run which op on this machine."""

from __future__ import annotations

import torch

from .dispatch import BACKENDS, available_backends, support_matrix


def report() -> str:
    lines = [f"torch {torch.__version__}  (cuda build: {torch.version.cuda or 'no'})", "", "backends:"]
    for info in available_backends().values():
        lines.append(f"  {info}")
    from .cpu import bf16_matmul_summary  # torch's GEMMs, not the kernels: said whether or not they are built

    lines += ["", bf16_matmul_summary()]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            lines += ["", f"op x backend on {device} {str(dtype).removeprefix('torch.')} ('ok' or why not):"]
            for op, row in support_matrix(device, dtype).items():
                lines.append(f"  {op:15s}" + "  ".join(f"{b}={row[b]}" for b in BACKENDS))
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
