"""condmoe.cluster: Ray launching, job submission, metrics export and the CLI."""
