"""Concerns every part of lmlab shares, each written once: atomic writes, progress display, device and
dtype resolution, distributed set-up, "did you mean" suggestions and fallback notices. Nothing here
imports any other lmlab module except lmlab.errors, so every module may use these."""
