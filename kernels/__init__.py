"""Triton kernels and their launchers (installed as ``ewc_fused.kernels``)."""
