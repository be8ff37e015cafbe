"""From the ``providers`` config to running providers (each behind the same interface)."""

from __future__ import annotations

import aiohttp
from redis.asyncio import Redis

from gateway.auth.cluster import LEASE_SECONDS, ClusterRefresher
from gateway.auth.oauth2 import OAuth2Login
from gateway.auth.password import PasswordLogin
from gateway.auth.provider import Provider, ProviderRuntime
from gateway.auth.refresh import RefreshCoordinator, Refresher, ResultHook
from gateway.config import Config, PasswordProvider
from gateway.sessions.seal import KeyRing


def build_providers(
    config: Config,
    client: aiohttp.ClientSession,
    keyring: KeyRing,
    redis: Redis | None,
    on_refresh_result: ResultHook,
) -> dict[str, ProviderRuntime]:
    timeouts = config.server.timeouts
    runtimes: dict[str, ProviderRuntime] = {}
    for name, settings in config.providers.items():
        provider: Provider
        if isinstance(settings, PasswordProvider):
            provider = PasswordLogin(name, settings, client, timeouts)
        else:
            provider = OAuth2Login(name, settings, client, timeouts, config.session, keyring, redis)
        refresher: Refresher = provider
        if redis is not None:
            refresher = ClusterRefresher(
                provider,
                redis,
                keyring,
                grace=settings.refresh_grace,
                wait_limit=(timeouts.connect or 60) + (timeouts.read or 60) + LEASE_SECONDS,
            )
        runtimes[name] = ProviderRuntime(
            name=name,
            provider=provider,
            coordinator=RefreshCoordinator(refresher, settings.refresh_grace, on_refresh_result),
            refresh_on=frozenset(settings.refresh_on),
            skew=settings.refresh_skew,
        )
    return runtimes
