"""One single-threaded call into MKL's vector math before torch runs it on two threads.

torch's CPU wheel computes fp32 cos, sin, exp, ... with MKL's vector math library (VML); when a process's
first VML call is split over two threads, one thread's share can come out at VML's low-accuracy setting
(cos off by up to 1.5e-4; docs/investigations.md). One call on one thread first prevents it, so the
canonical decoder's module makes that call when imported.
"""

import torch


def initialize_vector_math() -> None:
    torch.cos(torch.zeros(8))  # 8 elements: below torch's parallel grain, so this runs on the calling thread
