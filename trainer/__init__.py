"""condmoe.trainer: what runs inside one worker: config, engine, loop, checkpoints."""
