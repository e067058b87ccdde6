"""Running one model over several devices: the process's place in the parallel layout
(:mod:`kvik.distributed.parallel_state`), start-up checks (:mod:`kvik.distributed.checks`, torch-free)
and the sharding helpers the parallel layers use. The processes themselves are started by an
executor (:mod:`kvik.executor`)."""
