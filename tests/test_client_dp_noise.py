"""The noise multiplier for a target client-level epsilon is the accountant's inverse."""

from __future__ import annotations

import pytest

from common.config import RunConfig
from common.dp import gaussian_epsilon, noise_for_releases
from server.privacy import client_level_epsilon


@pytest.mark.parametrize("epsilon,rounds", [(8.0, 1), (8.0, 4), (3.0, 10), (1.0, 3)])
def test_noise_spends_the_target_and_no_less_noise_would(epsilon, rounds):
    z = noise_for_releases(epsilon, rounds, 1e-5)
    spent = gaussian_epsilon(z, rounds, 1e-5)
    assert epsilon - 0.02 <= spent <= epsilon
    assert gaussian_epsilon(0.98 * z, rounds, 1e-5) > epsilon  # the smallest such noise
    # what a run with that multiplier reports as 'client-epsilon'
    cfg = RunConfig(client_dp="server-fixed", client_dp_noise_multiplier=z, dp_delta=1e-5)
    assert client_level_epsilon(cfg, rounds) == pytest.approx(spent)


def test_more_rounds_need_more_noise():
    assert noise_for_releases(8.0, 8, 1e-5) > noise_for_releases(8.0, 4, 1e-5)


@pytest.mark.parametrize("args", [(0.0, 4, 1e-5), (8.0, 0, 1e-5), (8.0, 4, 1.0), (8.0, 2.5, 1e-5)])
def test_bad_input_is_one_error(args):
    with pytest.raises(ValueError, match="noise_for_releases"):
        noise_for_releases(*args)


def test_an_unreachable_epsilon_says_what_to_change():
    with pytest.raises(ValueError, match="raise epsilon or release fewer times") as err:
        noise_for_releases(0.01, 4, 1e-5)
    assert "\n" not in str(err.value)
