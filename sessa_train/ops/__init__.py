"""Kernels behind one dispatch function each, with a pure-torch reference beside them."""

from sessa_train.ops.feedback import Solver, feedback_decode_step, feedback_solve, select_solver

__all__ = ["Solver", "feedback_decode_step", "feedback_solve", "select_solver"]
