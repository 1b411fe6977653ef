"""Sharded banks: a machine's prebuilt banks split along their entry axis over a device mesh.

Each device streams its slice of every bank; the partial statistics (max, normaliser, weighted sum)
are merged exactly with ``pmax``/``psum`` (:func:`ellsjax.kernel.merge_across`), so results equal the
single-device ones up to float32 summation order. Every device holds an equal share (±1 entry)
of each bank's real entries (:func:`place`). Banks are built on the host (per process) and each
device receives only its slice (``jax.make_array_from_callback``), so the same code runs on one host
with several devices and on a multi-host cluster after ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from ellsjax import kernel as _kernel
from ellsjax.machines import _banks

if TYPE_CHECKING:
    from ellsjax.machines.base import Machine

__all__ = ["shard", "place", "stream_sharded"]


def shard(machine: Machine, mesh: Any = None, *, axis: str = "bank") -> Machine:
    """``machine`` with its banks to be split over ``mesh`` along ``axis`` (see :meth:`Machine.shard`)."""
    if mesh is None:
        mesh = jax.make_mesh((jax.device_count(),), (axis,), axis_types=(jax.sharding.AxisType.Explicit,))
    if axis not in mesh.axis_names:
        raise ValueError(f"axis: {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    policy = dataclasses.replace(machine.policy, mesh=mesh, mesh_axis=axis, tolerance=None)
    return dataclasses.replace(machine, policy=policy, banks={})


def place(machine: Machine, gb: _banks.GroupBank) -> _banks.DeviceBank:
    """Pack a host bank for the kernel and move it to the device(s): whole, or split along its
    entry axis over the machine's mesh. With pruning on, its entries are ordered in bounded blocks.

    Placement over ``n`` devices (:func:`ellsjax.machines._banks.pack_group_bank`): the entry axis is
    cut into ``n`` equal slots, device ``i`` of the mesh axis receives slot ``i``, and each bank's
    ``u`` real entries are split into ``n`` consecutive runs of ``⌈u/n⌉`` or ``⌊u/n⌋`` entries, one at
    the start of each slot (padding, which weighs exactly 0, after it). So every device streams its
    share of real entries and the cross-device merge (:func:`ellsjax.kernel.merge_across`) combines
    ``n`` non-empty partial softmaxes (fewer only when ``u < n``).
    """
    policy = machine.policy
    devices = policy.devices
    multiple = _banks.pad_multiple(gb.keys.shape[2], devices)
    block = None
    if policy.prune is not None:
        block = min(policy.prune_block, multiple // devices)
    packed = _banks.pack_group_bank(gb, multiple, block, devices=devices)
    if policy.mesh is None:
        return jax.tree.map(jnp.asarray, packed)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def put(v, axis):
        spec = [None] * v.ndim
        spec[axis] = policy.mesh_axis
        return jax.make_array_from_callback(v.shape, NamedSharding(policy.mesh, P(*spec)), lambda idx: v[idx])

    blocks = None
    if packed.blocks is not None:  # each device's blocks with its entries; the rest replicated
        b = packed.blocks
        rep = lambda v: jax.device_put(v, NamedSharding(policy.mesh, P()))  # noqa: E731
        blocks = _banks.BlockIndex(put(b.centers, 2), put(b.radii, 2), put(b.counts, 2), rep(b.key_norm),
                                   rep(b.basis), put(b.lo, 2), put(b.hi, 2), put(b.perp_lo, 2), put(b.perp_hi, 2))
    return _banks.DeviceBank(put(packed.keys_t, 3), put(packed.vv, 2),
                             None if packed.values is None else put(packed.values, 2), blocks)


def _spec(bank: _banks.DeviceBank, ax: str):
    from jax.sharding import PartitionSpec as P

    blocks = None
    if bank.blocks is not None:
        blocks = _banks.BlockIndex(P(None, None, ax, None), P(None, None, ax), P(None, None, ax), P(), P(),
                                   P(None, None, ax, None), P(None, None, ax, None), P(None, None, ax),
                                   P(None, None, ax))
    return _banks.DeviceBank(P(None, None, None, ax), P(None, None, ax, None),
                             None if bank.values is None else P(None, None, ax, None), blocks)


def stream_sharded(machine: Machine, queries, bank: _banks.DeviceBank, label, positions_per_image: int,
                   bank_map=None):
    """Posterior means of one group's queries over a bank split across the machine's mesh."""
    from jax.sharding import PartitionSpec as P

    ax = machine.policy.mesh_axis
    bspec = _spec(bank, ax)

    def local(q, b, lab):
        stats = machine._bank_stats(q, b, lab, positions_per_image, bank_map)
        return _kernel.finalize(_kernel.merge_across(stats, q.inv_temp, ax))

    mesh = machine.policy.mesh
    if label is None:
        fn = jax.shard_map(lambda q, b: local(q, b, None), mesh=mesh, in_specs=(P(), bspec), out_specs=P(),
                           check_vma=False)
        return fn(queries, bank)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), bspec, P()), out_specs=P(), check_vma=False)
    return fn(queries, bank, label)
