# Claim mode: a board set up offline holds its site's claim key instead of an identity. It asks
# its gateway for one until an admin approves it (docs/protocol.md, "Claiming an identity"),
# then saves the identity in its config and restarts as an ordinary node. It takes no readings
# meanwhile: there is no identity yet to send them under.
import asyncio
import os
import time
import machine
from binascii import hexlify

import wire
from node import config, log
from node.link import read_frame
from node.net import Gateway, Wifi

ANSWER_TIMEOUT_MS = 5000  # the gateway answers a CLAIM at once (the fleet is asked later)
REJECTED_RETRY_FACTOR = 10  # a rejected board asks again rarely: an admin may change their mind


def _hex(data):
    return hexlify(data).decode()


class Claimer:
    def __init__(self, cfg, state, version, wdt, on_good):
        self.on_good = on_good  # called once when the boot has claimed for good_after_ms
        self.cfg = cfg
        self.state = state
        self.version = version
        self.wdt = wdt
        self.wifi = Wifi(cfg["wifi"])
        self.gateway = Gateway(cfg["gateway"])
        self.device_id = b"kb" + bytes(self.wifi.wlan.config("mac"))
        if cfg.get("claim_nonce") is None:
            # Made once and kept: after a reboot the board repeats the same claim, which is the
            # one an admin may already have approved.
            cfg["claim_nonce"] = _hex(os.urandom(wire.CLAIM_NONCE_SIZE))
            config.save(cfg)
        self.nonce = bytes.fromhex(cfg["claim_nonce"])
        site_key = cfg["claim_key"].encode()
        self.claim_key = wire.Key(self.device_id, wire.CLAIM_KEY_ID, site_key)
        self.secret = wire.claim_secret(site_key, self.device_id, self.nonce)
        self.guard = wire.DownlinkGuard(state.boot)
        self._frame = bytearray(wire.MAX_FRAME)

    def lookup(self, device_id, key_id):
        # The gateway answers under the claim key, or under the key the approval issued, whose
        # secret this board derives itself: only an approval of its very claim verifies.
        if device_id != self.device_id:
            return None
        if key_id == wire.CLAIM_KEY_ID:
            return self.claim_key
        return wire.Key(self.device_id, key_id, self.secret)

    async def ask(self):
        """One claim; the gateway's answer (IDENTITY or ERROR), or an exception. Each step is
        bounded: the connect (net.CONNECT_TIMEOUT_MS), then sending and the answer together."""
        stream = await self.gateway.connect(self.wdt)
        try:
            return await asyncio.wait_for_ms(self._exchange(stream), ANSWER_TIMEOUT_MS)
        finally:
            stream.close()
            await stream.wait_closed()

    async def _exchange(self, stream):
        stream.write(wire.encode_claim(self.claim_key, self.state.boot,
                                       self.guard.next_counter(), self.nonce, self.version))
        await stream.drain()
        return await read_frame(stream, self._frame, self.lookup, self.guard)

    def adopt(self, key_id):
        new = dict(self.cfg)
        new["device_id"] = _hex(self.device_id)
        new["key_id"] = key_id
        new["secret"] = _hex(self.secret)
        del new["claim_key"]
        del new["claim_nonce"]
        config.validate(new)
        config.save(new)
        log.info("claim approved: device %s, key id %d; restarting", new["device_id"], key_id)
        time.sleep_ms(100)
        machine.reset()

    async def run(self):
        log.info("claiming an identity for %s at the site's gateway", _hex(self.device_id))
        asyncio.create_task(self.wdt.keep_fed())  # every wait below is bounded
        retry = self.cfg["claim_retry_ms"]
        started = time.ticks_ms()
        good = False
        while True:
            wait = retry
            try:
                if await self.wifi.up():
                    answer = await self.ask()
                    if answer.type == wire.IDENTITY:
                        self.adopt(answer.key_id)
                    elif answer.type == wire.ERROR_DOWN:
                        log.info("claim: %s", wire.reason_name(answer.reason))
                        if answer.reason == wire.CLAIM_REJECTED:
                            wait = retry * REJECTED_RETRY_FACTOR
                        elif answer.reason == wire.STALE_BOOT:
                            self.state.boot = answer.ref  # the gateway saw a later boot
                            self.state.save()
                            machine.reset()
            except (OSError, EOFError, asyncio.TimeoutError, wire.FrameError) as e:
                log.info("claim: no answer: %r", e)
            if not good and time.ticks_diff(time.ticks_ms(), started) >= self.cfg["good_after_ms"]:
                good = True
                self.on_good()  # claiming is what this boot is for: it is not failing
            await asyncio.sleep_ms(wait)
