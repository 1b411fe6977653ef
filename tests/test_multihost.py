"""Sharded banks across two processes on localhost (the multi-host recipe of docs/guides/scaling.md), checked
against a single-process result: every device holds its share of the entries, and the cross-device
merge's rescale term changes the result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import ellsjax as ej

REPO = Path(__file__).resolve().parents[1]


def case():
    """The data both worker processes and this test use."""
    rng = np.random.default_rng(7)
    imgs = rng.uniform(-1, 1, (9, 8, 8, 1)).astype(np.float32)
    x = rng.normal(size=(2, 8, 8, 1)).astype(np.float32)
    t = np.array([0.3, 0.7], np.float32)
    return imgs, x, t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_shard_els_and_is_banks(tmp_path):
    out = tmp_path / "result.npz"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "_multihost_worker.py"), str(rank), str(port),
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:  # never leave a worker behind (a failed peer leaves the other waiting)
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(logs)[-4000:]
    imgs, x, t = case()
    with np.load(out) as got:
        for name, scale in (("els", 3), ("is", None)):
            m = ej.machines.build(name, imgs).prepare((scale,))
            want = np.asarray(m.denoise(x, t, scale=scale))
            np.testing.assert_allclose(got[name], want, atol=1e-6, err_msg=name)
            if name == "els":  # the merge's rescale term matters here: without it the result changes
                assert np.abs(got["els/broken"] - want[:1]).max() > 1e-2
            # where the entries live: each of the 4 devices (2 per process) holds its even share
            per_device = {}
            for rank in (0, 1):
                with np.load(f"{out}.rank{rank}.npz") as local:
                    for k in local.files:
                        bank, start = k.rsplit("/", 1)
                        per_device.setdefault(bank, {})[int(start)] = local[k]
            for key, groups in m.banks.items():
                for group, bank in groups.items():
                    slices = per_device.pop(f"{name}/{key}/{group}")
                    counts = np.stack([slices[s] for s in sorted(slices)])  # [4, Kb, G]
                    total = (np.asarray(bank.vv[..., 0]) > 0).sum(-1)
                    assert counts.shape[0] == 4 and total.min() >= 4 and counts.min() > 0, (name, group)
                    np.testing.assert_array_equal(counts.sum(0), total)
                    assert counts.max(0).tolist() == (-(-total // 4)).tolist(), (name, group)  # ⌈u/4⌉
                    assert counts.min(0).tolist() == (total // 4).tolist(), (name, group)  # ⌊u/4⌋
            assert not [k for k in per_device if k.startswith(f"{name}/")], per_device  # no other bank
