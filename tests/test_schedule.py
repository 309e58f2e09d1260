import pytest

from lib_hires.scalecrafter import official_step, official_timestep, scheduled_factor
from lib_hires.scalecrafter.schedule import last_active_timestep


def test_official_timesteps_map_to_their_step_index():
    for i in range(50):
        assert official_timestep(i) == 981 - 20 * i
        assert official_step(981 - 20 * i) == i
        assert official_step(981 - 20 * i + 0.3) == i  # k-diffusion hands fractional timesteps


def test_timesteps_between_official_steps_go_to_the_nearest_one():
    assert official_step(999) == 0
    assert official_step(972) == 0
    assert official_step(970) == 1
    assert official_step(391) == 30  # midpoint of 401 (i=29) and 381 (i=30)
    assert official_step(0) == 49


@pytest.mark.parametrize("tau,d,expected", [
    # official tables (scalecrafter.md section 1.6): steps with factor 4 / 3 / 2 / vanilla
    (35, 4, [4] * 9 + [3] * 9 + [2] * 17 + [1] * 15),
    (35, 3, [3] * 12 + [2] * 23 + [1] * 15),
    (37, 4, [4] * 10 + [3] * 9 + [2] * 18 + [1] * 13),
    (37, 3, [3] * 13 + [2] * 24 + [1] * 13),
])
def test_progressive_decay_matches_the_official_tables(tau, d, expected):
    assert [scheduled_factor(d, i, tau, True) for i in range(50)] == expected


def test_fixed_schedule_and_fractional_factors():
    assert [scheduled_factor(2.5, i, 30, False) for i in (0, 29, 30, 49)] == [2.5, 2.5, 1.0, 1.0]
    # a fractional or sub-2 factor never grows under progressive decay
    assert scheduled_factor(2.4, 0, 35, True) == 2.4
    assert scheduled_factor(1.5, 0, 35, True) == 1.5
    assert scheduled_factor(1.0, 0, 35, True) == 1.0


def test_last_active_timestep():
    assert last_active_timestep(30) == 401
    assert last_active_timestep(35) == 301
    assert last_active_timestep(37) == 261
    assert last_active_timestep(27.5) == 441
    assert last_active_timestep(0) is None
