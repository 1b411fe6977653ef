"""One process of the two-process test in tests/test_multihost.py (not collected by pytest).

Usage: python tests/_multihost_worker.py RANK PORT OUT.npz

Each process: 2 forced CPU devices, gloo collectives, ``jax.distributed.initialize`` with a
127.0.0.1 coordinator; both build the same ELS and IS machines, shard their banks over the 4 devices
of both processes, denoise the same batch, and process 0 writes the gathered results. Each process
also writes ``OUT.rankR.npz``: the real entries of every bank on each of its own devices (where its
slice starts along the entry axis, and the count), and both then denoise once more with ELS and the
cross-device merge's rescale term dropped (process 0 writes that result too, as ``els/broken``).
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
                           initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import ellsjax as ej  # noqa: E402
from tests.test_multihost import case  # noqa: E402
from tests.test_scaleout import no_rescale_merge  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2, (jax.device_count(), jax.local_device_count())
imgs, x, t = case()
results, local = {}, {}
machines = {}
for name, scale in (("els", 3), ("is", None)):
    m = ej.machines.build(name, imgs).shard()  # a mesh over all 4 devices of both processes
    m = m.prepare((scale,))  # each process builds the bank on its host, places only its devices' slices
    assert m.banks, "the bank should be prebuilt (and sharded)"
    machines[name] = m
    got = m.denoise(x, t, scale=scale)
    results[name] = np.asarray(multihost_utils.process_allgather(got, tiled=True))
    for key, groups in m.banks.items():
        for group, bank in groups.items():
            for s in bank.vv.addressable_shards:
                start = s.index[2].start or 0
                local[f"{name}/{key}/{group}/{start}"] = (np.asarray(s.data[..., 0]) > 0).sum(-1)
ej.kernel.merge_across = no_rescale_merge
got = machines["els"].denoise(x[:1], t[:1], scale=3)  # one image fewer: a new trace, with the broken merge
results["els/broken"] = np.asarray(multihost_utils.process_allgather(got, tiled=True))
np.savez(f"{out}.rank{rank}.npz", **local)
if rank == 0:
    np.savez(out, **results)
jax.distributed.shutdown()
