"""condmoe.datasets: WebDataset shards: write, verify, stream, resume."""
