"""condmoe: train conditional-computation networks at cluster scale.

The code lives in the repository's root folders (routing/, datasets/, trainer/,
cluster/), installed as condmoe.routing, condmoe.datasets, ... through
setuptools' package-dir mapping (see docs/architecture.md).
"""

__version__ = "0.1.0"
