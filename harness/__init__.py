"""wsolbench: a benchmark and reproducibility harness for weakly supervised object localization.

The package is laid out along the one-way data flow
config -> dataset -> method -> trainer -> score maps -> evaluator -> store -> report:
`wsolbench.datasets` (metadata readers, images, generated data), `wsolbench.methods` (backbones,
WSOL methods, the DA-WSOL wrapper) and the harness modules at the top level (config, trainer,
evaluator, CLI).
"""

__version__ = "0.1.0"
