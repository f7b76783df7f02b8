"""Triton device code for fastlatent; installed as ``fastlatent.kernels``.

Keep this file free of imports: from the repository root, bitsandbytes probes for a
top-level ``kernels`` package and imports this folder under that name.
"""
