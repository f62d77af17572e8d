"""``ewc_fused.bench``: the optimizer-step and per-sample Fisher benchmarks (``ewc-fused bench``).

Modules: :mod:`.step` (optimizer step), :mod:`.fisher` (per-sample Fisher and tracked
training), :mod:`.models` (workloads), :mod:`.common` (timing, memory, environment),
:mod:`.report` (JSON, markdown, plots), :mod:`.cli` (the command line).
"""
