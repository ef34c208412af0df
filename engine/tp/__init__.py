"""Tensor parallelism: N ranks, each holding its ShardPlan's share of the model, run the same calls in lockstep.

Rank 0, the leader, is the process that serves: its Engine, states and decode batches look like unsharded ones.
One module per job:

    plan.py      which slice of every weight and state tensor a rank holds (the sharding plan)
    degree.py    whether a degree shards a model at all (torch-free: a service checks its flags with it)
    group.py     TPGroup: the collectives inside the forward, the control group, the group's lifetime (RankLost)
    shm.py       the shared-memory transport of CPU ranks on one host (all-reduce, all-gather as qwenpd:: ops)
    calls.py     cross-rank calls: a registry of named calls, the Call message, the followers' loop
    state_io.py  state across ranks in the canonical layout: gather, scatter, read from shared memory, staged
                 slices that each rank writes into a shared checkpoint itself
    launch.py    starting the follower ranks (child processes that die with the leader) and their entry point

The rest of the engine meets this package at one seam: objects that live on every rank carry `mirror`
(calls.Mirror, None when not sharded) and their cross-rank methods are registered with `calls.cross_rank`.
"""

