"""Kernels that are not softmax attention, and their naive references (``nearfar.functional`` exports them)."""
