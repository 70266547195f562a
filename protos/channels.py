"""A bounded cache of gRPC channels, one per peer address, least recently used evicted first.

Services open channels to addresses their callers name (decode → the request's prefill instance,
the KV sender → the request's decode receiver). Kept forever, one channel per distinct address is
memory anyone who reaches the port can grow; bounded, an evicted peer only pays a reconnect. An
evicted channel is closed with a grace period, so calls already running on it finish.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import grpc

DEFAULT_MAX_CHANNELS = 64  # distinct peers at once: far above any deployment's instance count
EVICT_GRACE_S = 60.0  # calls in flight on an evicted channel get this long to finish


class ChannelCache:
    """``get(address)`` returns the channel to ``address``, opening it with ``open`` on first use.

    ``on_evict(address)`` runs when an address leaves the cache (state kept per peer elsewhere, like
    a finished handshake, goes with it). Used from one event loop; ``close`` closes every channel.
    """

    def __init__(
        self,
        open: Callable[[str], grpc.aio.Channel],
        max_channels: int = DEFAULT_MAX_CHANNELS,
        on_evict: Callable[[str], None] | None = None,
        evict_grace_s: float = EVICT_GRACE_S,
    ) -> None:
        assert max_channels >= 1, "max_channels must be >= 1"
        self._open, self.max_channels, self._on_evict = open, max_channels, on_evict
        self.evict_grace_s = evict_grace_s
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # evicted, within their grace
        self.num_evicted = 0

    def __len__(self) -> int:
        return len(self._channels)

    def __contains__(self, address: object) -> bool:
        return address in self._channels

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        channel = self._channels[address] = self._open(address)
        while len(self._channels) > self.max_channels:
            self._evict(*self._channels.popitem(last=False))
        return channel

    def _evict(self, address: str, channel: grpc.aio.Channel) -> None:
        self.num_evicted += 1
        if self._on_evict is not None:
            self._on_evict(address)
        task = asyncio.get_running_loop().create_task(channel.close(self.evict_grace_s))
        self._closing[task] = channel
        task.add_done_callback(lambda t: self._closing.pop(t, None))

    async def close(self) -> None:
        """Close every channel now (in-flight calls are cancelled), evicted ones included."""
        evicted = dict(self._closing)
        for task in evicted:
            task.cancel()
        await asyncio.gather(*evicted, return_exceptions=True)
        # A close cancelled within its grace left its channel open: closing again ends it.
        channels = [*self._channels.values(), *evicted.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close()
