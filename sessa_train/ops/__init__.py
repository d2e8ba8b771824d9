"""Kernels behind one dispatch function each, with a pure-torch reference beside them."""

from sessa_train.ops.feedback import BACKENDS, feedback_decode_step, feedback_solve

__all__ = ["BACKENDS", "feedback_decode_step", "feedback_solve"]
