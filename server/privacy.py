"""Client-level DP: Flower's strategy wrappers around the chosen strategy, and the
epsilon they spend, by Opacus' RDP accountant.

Flower's wrappers clip each client's adapter update (on the server, or on the client
with a mod) and add Gaussian noise to the mean. Their noise is calibrated to an
unweighted mean over 'clients-per-round' replies, so under client-level DP the
strategy averages with a unit weight per reply (``UNIT_WEIGHT_KEY``), not by example
counts: a client with many examples would otherwise move the mean by more than
clip / n and the guarantee would not hold.

Accounting: Flower samples a fixed number of clients without replacement, not by
Poisson sampling, so no amplification by subsampling is claimed: each round is one
Gaussian release with the configured noise multiplier (for the adaptive modes that
multiplier covers the noisy clipped-count too; Andrew et al., 2021). Flower's own
accountant needs Google's dp-accounting and a plain FedAvg, so we use Opacus'.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping, DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping, DifferentialPrivacyServerSideFixedClipping,
)

from common.config import RunConfig
from common.dp import gaussian_epsilon, sigma_for_epsilon_per_release


class _Forwarding:
    """Lets RoundHook read the inner strategy's traffic, state and round offset."""

    def __getattr__(self, name):
        if name == "strategy":  # not yet set during __init__
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def aggregate_train(self, server_round, replies):
        # Flower's adaptive wrappers iterate the replies twice: give them a list.
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            traffic = self.strategy.traffic
            traffic.aggregated = False
            if not (traffic.replies or traffic.failures):
                # Flower's wrapper refused the round (an error reply) before the inner
                # strategy saw it: count the replies so the history stays true.
                self.strategy.receive(replies)
                self.strategy.count_replies(server_round, replies)
        return arrays, metrics


def _wrapped(base):
    return type(f"FedTune{base.__name__}", (_Forwarding, base), {})


def wrap_client_dp(strategy, cfg: RunConfig):
    """``strategy`` inside the Flower DP wrapper that 'client-dp' names (or as is)."""
    mode, n = cfg.client_dp, cfg.clients_per_round
    z, clip = cfg.client_dp_noise_multiplier, cfg.client_dp_clipping_norm
    if mode in ("off", "local"):
        return strategy  # local: the clients' LocalDpMod adds the noise
    if mode in ("server-fixed", "client-fixed"):
        base = (DifferentialPrivacyServerSideFixedClipping if mode == "server-fixed"
                else DifferentialPrivacyClientSideFixedClipping)
        return _wrapped(base)(strategy, z, clip, n)
    base = (DifferentialPrivacyServerSideAdaptiveClipping if mode == "server-adaptive"
            else DifferentialPrivacyClientSideAdaptiveClipping)
    # Flower's default count noise (n / 20) cannot carry a noise multiplier >= n / 10,
    # which is every useful one for a few clients; z keeps the update noise at 1.15 z.
    return _wrapped(base)(strategy, z, n, initial_clipping_norm=clip,
                          clipped_count_stddev=max(n / 20, z))


def client_level_epsilon(cfg: RunConfig, releases: int) -> float:
    """Epsilon (at 'dp-delta') of a client's updates after ``releases`` rounds."""
    if cfg.client_dp == "off":
        return 0.0
    if cfg.client_dp == "local":
        sigma = sigma_for_epsilon_per_release(cfg.local_dp_epsilon, cfg.dp_delta)
        return gaussian_epsilon(sigma, releases, cfg.dp_delta)
    return gaussian_epsilon(cfg.client_dp_noise_multiplier, releases, cfg.dp_delta)
