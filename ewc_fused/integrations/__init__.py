"""Integrations with other libraries; each submodule imports its library only when imported.

* :mod:`ewc_fused.integrations.transformers`: a Hugging Face ``Trainer`` callback
  (``pip install "ewc-fused[hf]"``).
"""
