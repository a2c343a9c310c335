"""Limits on logging in: failed attempts per client address and per account, and how many
password hashes run at once.

Argon2id costs 64 MiB and tens of milliseconds a hash by design, so unlimited logins are both a
password-guessing oracle and a way to exhaust the service's memory and stall every other
request (60 concurrent wrong logins took it from 170 MB to 1.09 GB). The limits are per fleet
instance, in memory: behind several instances an attacker gets each instance's allowance.
"""

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from kinhbac.fleet.rate_limits import SlidingWindow, TooManyAttempts

__all__ = ["LoginLimiter", "TooManyAttempts"]


class LoginLimiter:
    def __init__(self, *, per_address: int, per_account: int, window_s: float,
                 concurrent_hashes: int, hash_wait_s: float = 5.0) -> None:
        self._addresses = SlidingWindow(per_address, window_s)
        self._accounts = SlidingWindow(per_account, window_s)
        self._lock = threading.Lock()
        # Waited for on the event loop, not in a thread: a login waiting for a slot must hold
        # no worker thread and no database connection, or 60 of them starve every other route
        # (bench/RESULTS.md, "Login benchmark").
        self._hashes = anyio.Semaphore(concurrent_hashes)
        self._hash_wait_s = hash_wait_s

    def check(self, address: str, account: str) -> None:
        """Raise TooManyAttempts while the address or the account has used its failures."""
        now = time.monotonic()
        with self._lock:
            by_address = self._addresses.wait_s(address, now)
            by_account = self._accounts.wait_s(account, now)
        if by_address:
            raise TooManyAttempts("too many failed logins from this address; try again later",
                                  int(by_address) + 1)
        if by_account:
            raise TooManyAttempts("too many failed logins for this account; try again later",
                                  int(by_account) + 1)

    def failed(self, address: str, account: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._addresses.add(address, now)
            self._accounts.add(account, now)

    def succeeded(self, account: str) -> None:
        """The account's owner is in: earlier failures of the account no longer count (the
        address's do: one host guessing several accounts stays limited)."""
        with self._lock:
            self._accounts.forget(account)

    @asynccontextmanager
    async def hashing(self) -> AsyncIterator[None]:
        """Hold one of the few password-hash slots; TooManyAttempts if none frees up soon."""
        acquired = False
        with anyio.move_on_after(self._hash_wait_s):
            await self._hashes.acquire()
            acquired = True
        if not acquired:
            raise TooManyAttempts("the service is busy checking passwords; try again shortly", 1)
        try:
            yield
        finally:
            self._hashes.release()

    def clear(self) -> None:
        with self._lock:
            self._addresses = SlidingWindow(self._addresses.limit, self._addresses.window_s)
            self._accounts = SlidingWindow(self._accounts.limit, self._accounts.window_s)
