"""clipline's shared layer: config, CLI, distributed init, checkpoint IO, model factory, shard format.

It imports no stage (data_prep, training, eval); the CLI's command table names them and imports them lazily.
"""

__version__ = "0.1.0"
