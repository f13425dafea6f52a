import math

import numpy as np
import pytest
import torch

from tasks import EpisodeSource
from tasks.sinusoid import SinusoidTasks


def test_shapes_and_dtypes():
    e = SinusoidTasks(shots=5, queries=7, seed=3).sample()
    assert e.support_x.shape == (5, 1) and e.support_y.shape == (5, 1)
    assert e.query_x.shape == (7, 1) and e.query_y.shape == (7, 1)
    assert e.classes.shape == (2,)
    for t in (e.support_x, e.support_y, e.query_x, e.query_y, e.classes):
        assert t.dtype == torch.float32
    b = SinusoidTasks(shots=5, queries=7).sample_batch(4)
    assert b.support_x.shape == (4, 5, 1) and b.query_y.shape == (4, 7, 1)
    assert b.classes.shape == (4, 2) and b.is_batched
    assert isinstance(SinusoidTasks(), EpisodeSource)


def test_targets_follow_closed_form():
    tasks = SinusoidTasks(shots=10, queries=10, seed=1)
    for i in range(20):
        e = tasks.sample(i)
        amplitude, phase = e.classes.double()
        for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
            expected = amplitude * torch.sin(x.double() - phase)
            # x, A and phase are each rounded to float32: |dy| <= 5 * 5 * 2**-24 * 3 or so.
            torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            SinusoidTasks.function(e.query_x, e.classes[0], e.classes[1]),
            e.query_y,
            atol=1e-5,
            rtol=0,
        )


def test_parameters_recoverable_by_least_squares():
    # Independent check of the sign convention: A sin(x - p) = A cos(p) sin(x) - A sin(p) cos(x).
    e = SinusoidTasks(shots=10, queries=0, seed=5).sample(0)
    x = e.support_x.double()[:, 0]
    design = torch.stack([torch.sin(x), torch.cos(x)], 1)
    coef = torch.linalg.lstsq(design, e.support_y.double()).solution[:, 0]
    amplitude, phase = e.classes.double()
    torch.testing.assert_close(
        coef,
        torch.stack([amplitude * torch.cos(phase), -amplitude * torch.sin(phase)]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_ranges_match_the_maml_paper():
    tasks = SinusoidTasks(shots=20, queries=20, seed=0)
    batch = [tasks.sample(i) for i in range(400)]
    amp = torch.stack([e.classes[0] for e in batch])
    phase = torch.stack([e.classes[1] for e in batch])
    x = torch.cat([torch.cat([e.support_x, e.query_x]) for e in batch])
    assert amp.min() >= 0.1 and amp.max() <= 5.0
    assert phase.min() >= 0.0 and phase.max() <= math.pi + 1e-6
    assert x.min() >= -5.0 and x.max() <= 5.0
    # Uniform draws cover their intervals (these fail if, e.g., a range were ignored).
    assert amp.min() < 0.3 and amp.max() > 4.8
    assert phase.min() < 0.1 and phase.max() > math.pi - 0.1
    assert x.min() < -4.95 and x.max() > 4.95
    assert abs(amp.mean().item() - 2.55) < 0.25


def test_custom_ranges():
    tasks = SinusoidTasks(amplitude_range=(1.0, 1.0), phase_range=(0.5, 0.5), x_range=(0, 1))
    e = tasks.sample(0)
    torch.testing.assert_close(e.classes, torch.tensor([1.0, 0.5]))
    assert e.support_x.min() >= 0 and e.support_x.max() <= 1


def test_determinism_and_resume():
    a, b = SinusoidTasks(seed=7), SinusoidTasks(seed=7)
    for _ in range(3):
        ea, eb = a.sample(), b.sample()
        torch.testing.assert_close(ea.support_x, eb.support_x, rtol=0, atol=0)
        torch.testing.assert_close(ea.query_y, eb.query_y, rtol=0, atol=0)
    # sample(i) is the i-th element of the stream, whatever was drawn before.
    torch.testing.assert_close(SinusoidTasks(seed=7).sample(2).classes, ea.classes, rtol=0, atol=0)
    state = a.state_dict()
    nxt = a.sample()
    c = SinusoidTasks(seed=0)
    c.load_state_dict(state)
    torch.testing.assert_close(c.sample().query_x, nxt.query_x, rtol=0, atol=0)
    other = SinusoidTasks(seed=8).sample(0)
    assert not torch.equal(other.classes, SinusoidTasks(seed=7).sample(0).classes)
    # Distinct tasks within a stream.
    assert not torch.equal(a.sample(0).classes, a.sample(1).classes)
    first = next(iter(SinusoidTasks(seed=7)))
    torch.testing.assert_close(first.support_y, SinusoidTasks(seed=7).sample(0).support_y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shots": 0}, "shots"),
        ({"queries": -1}, "queries"),
        ({"seed": -1}, "seed"),
        ({"amplitude_range": (5.0, 0.1)}, "amplitude_range"),
        ({"x_range": (0.0, np.inf)}, "x_range"),
        ({"phase_range": 3.0}, "phase_range"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinusoidTasks(**kwargs)
