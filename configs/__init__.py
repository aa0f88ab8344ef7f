"""condmoe's job files, installed as package data (condmoe.configs): ``condmoe train condmoe:coe``
runs configs/coe.yaml from any install, editable or not (see condmoe.cluster.cli.resolve_job)."""
