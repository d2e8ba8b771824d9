"""Test-session set-up: Triton kernels run in its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any
test module is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
