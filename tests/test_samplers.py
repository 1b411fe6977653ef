"""DDIM: the compiled trajectory equals the step-by-step formula; argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ellsjax as ej
from tests.conftest import unchecked_shapes


def setup(n=8, shape=(8, 8, 1), b=2, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(-1, 1, (n, *shape)).astype(np.float32)
    x = rng.normal(size=(b, *shape)).astype(np.float32)
    return imgs, x


def manual_ddim(m, x, ts, scales, label=None):
    sched = m.schedule
    for i in range(len(ts) - 1):
        a, s = (float(v) for v in sched(ts[i]))
        a2, s2 = (float(v) for v in sched(ts[i + 1]))
        x0 = m.denoise(x, ts[i], scale=None if scales is None else scales[i], label=label)
        eps = (x - a * x0) / s
        x = a2 * x0 + s2 * eps
    return x


@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_ddim_equals_manual_steps(padding):
    imgs, x = setup()
    m = ej.machines.els(imgs, padding=padding)
    ts = [0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    scales = [7, 5, 5, 3, 3]  # runs of equal scales are scanned
    got = ej.samplers.ddim(m, x, ts, scales=scales)
    np.testing.assert_allclose(got, manual_ddim(m, x, ts, scales), atol=2e-5)


def test_trajectory():
    imgs, x = setup()
    m = ej.machines.local(imgs)
    ts = np.array([0.8, 0.4, 0.2, 0.0], np.float32)
    out, traj = ej.samplers.ddim(m, x, ts, scales=[5, 3, 3], return_trajectory=True)
    assert traj.xs.shape == (4, 2, 8, 8, 1) and traj.x0s.shape == (3, 2, 8, 8, 1)
    np.testing.assert_array_equal(traj.xs[0], x)
    np.testing.assert_array_equal(traj.xs[-1], out)
    # the last step lands on t = 0 where x = x̂0
    np.testing.assert_allclose(traj.x0s[-1], out, atol=1e-6)
    np.testing.assert_allclose(traj.x0s[1], m.denoise(traj.xs[1], 0.4, scale=3), atol=1e-5)


def test_ideal_score_memorizes():
    imgs, x = setup(n=6, b=3)
    m = ej.machines.ideal(imgs)
    out = np.asarray(ej.samplers.ddim(m, x, ej.schedules.paper_times(20)))
    d = ((out[:, None] - imgs[None]) ** 2).reshape(3, 6, -1).sum(-1)
    assert np.all(d.min(1) < 1e-6)


def test_conditional_sampling_stays_in_class():
    imgs, x = setup(n=6, b=2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    m = ej.machines.ideal(imgs, labels)
    out = np.asarray(ej.samplers.ddim(m, x, [0.9, 0.5, 0.1, 0.0], label=[1, 0]))
    d = ((out[:, None] - imgs[None]) ** 2).reshape(2, 6, -1).sum(-1)
    assert labels[d[0].argmin()] == 1 and labels[d[1].argmin()] == 0


def test_progress_callback_and_bar(capsys):
    imgs, x = setup()
    m = ej.machines.els(imgs)
    seen = []
    quiet = ej.samplers.ddim(m, x, [0.9, 0.6, 0.3, 0.0], scales=[5, 3, 3], progress=seen.append)
    assert seen == [0, 1, 2]
    capsys.readouterr()
    shown = ej.samplers.ddim(m, x, [0.9, 0.6, 0.3, 0.0], scales=[5, 3, 3], progress=True)
    err = capsys.readouterr().err  # tqdm writes to stderr: the bar reached its 3 steps
    assert "sampling" in err and "3/3" in err, err
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(quiet))  # the bar changes nothing


def test_sampler_is_one_program_under_user_jit():
    imgs, x = setup()
    m = ej.machines.els(imgs)
    f = jax.jit(lambda mm, xx, ts: ej.samplers.ddim(mm, xx, ts, scales=(5, 3)))
    np.testing.assert_allclose(f(m, x, jnp.array([0.9, 0.4, 0.0])), ej.samplers.ddim(m, x, [0.9, 0.4, 0.0], scales=(5, 3)), atol=1e-6)


class TestBadInput:
    imgs, x = setup()
    m = ej.machines.els(imgs)

    def test_scales(self):
        with pytest.raises(ValueError, match=r"scales: expected 2 values"):
            ej.samplers.ddim(self.m, self.x, [0.9, 0.5, 0.0], scales=[3, 3, 3])
        with pytest.raises(ValueError, match="scales: this denoiser needs"):
            ej.samplers.ddim(self.m, self.x, [0.9, 0.5, 0.0])
        with pytest.raises(ValueError, match=r"scales\[1\]: scale: patch size must be"):
            ej.samplers.ddim(self.m, self.x, [0.9, 0.5, 0.0], scales=[3, 4])
        with pytest.raises(ValueError, match=r"scales\[0\]: scale: patch size 9"):
            ej.samplers.ddim(self.m, self.x, [0.9, 0.5, 0.0], scales=[9, 3])
        with pytest.raises(TypeError, match="scales: expected a sequence"):
            ej.samplers.ddim(self.m, self.x, [0.9, 0.5, 0.0], scales=3)

    @pytest.mark.parametrize(
        "ts,msg",
        [([0.5], "at least 2"), ([0.2, 0.5, 0.0], "strictly decreasing"), ([1.2, 0.5], r"\[0, 1\]"),
         ([0.5, np.nan], "NaN"), ([[0.5, 0.0]], "1-D")],
    )
    def test_times(self, ts, msg):
        with pytest.raises(ValueError, match="ts: .*" + msg), unchecked_shapes():  # [[0.5, 0.0]] is no 1-D grid
            ej.samplers.ddim(self.m, self.x, ts, scales=[3] * (max(len(np.ravel(ts)), 2) - 1))

    def test_other(self):
        with pytest.raises(ValueError, match="x_start: expected images of shape"):
            ej.samplers.ddim(self.m, self.x[:, :4], [0.9, 0.0], scales=[3])
        with pytest.raises(TypeError, match="denoiser"):
            ej.samplers.ddim(lambda x, t: x, self.x, [0.9, 0.0])
        with pytest.raises(ValueError, match="label: this machine was built without labels"):
            ej.samplers.ddim(self.m, self.x, [0.9, 0.0], scales=[3], label=1)
