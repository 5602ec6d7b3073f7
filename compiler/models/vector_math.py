"""One single-threaded call into MKL's vector math before torch runs it on two threads.

torch's CPU wheel computes fp32 cos, sin, exp, ... with MKL's vector math library (VML). When a process's
first VML call is split over two threads (a tensor above torch's parallel grain, such as a 2048-position
rope table), one thread's share can come out at VML's low-accuracy setting: cos off by up to 1.5e-4,
in about 1 process of 15 on a 2-vCPU x86 host (PLATFORM-NOTES). Any one VML call on one thread first
prevents it: 0 of 132 processes after it. The canonical decoder's module makes that call when imported, so every path
that computes with a model has made it.
"""

import torch


def initialize_vector_math() -> None:
    torch.cos(torch.zeros(8))  # 8 elements: below torch's parallel grain, so this runs on the calling thread
