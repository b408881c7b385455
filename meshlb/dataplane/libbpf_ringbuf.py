"""BPF ring buffer consumer (libbpf ring_buffer__*)."""
from __future__ import annotations

import ctypes
import errno
from typing import Callable

from .libbpf_ffi import RINGBUF_SAMPLE_FN, BpfError, Closeable, check, lib
from .libbpf_map import BPF_MAP_TYPE_RINGBUF, Map


class RingBuffer(Closeable):
    """Delivers each record of a RINGBUF map to ``callback(bytes)``.

    A Python exception in the callback is stored, the C side is told to stop
    (libbpf advances past that record and leaves the rest for the next call),
    and the exception is re-raised from :meth:`poll`/:meth:`consume`.
    """

    def __init__(self, map: Map, callback: Callable[[bytes], None]) -> None:
        if map.type != BPF_MAP_TYPE_RINGBUF:
            raise BpfError(errno.EINVAL, f"ring_buffer__new: map {map.name!r} is type "
                                         f"{map.type}, not RINGBUF")
        self._map = map  # keeps the map fd alive as long as we read from it
        self._callback = callback
        self._pending: BaseException | None = None
        # libbpf keeps this function pointer: it must live as long as self._rb.
        self._c_sample = RINGBUF_SAMPLE_FN(self._on_sample)
        ptr = lib().ring_buffer__new(map.fd, self._c_sample, None, None)
        if not ptr:
            raise BpfError(ctypes.get_errno() or errno.EINVAL,
                           f"ring_buffer__new(map {map.name!r})")
        self._rb = ptr

    def _on_sample(self, _ctx, data, size) -> int:
        try:
            self._callback(ctypes.string_at(data, size))
            return 0
        except BaseException as e:  # noqa: BLE001 - re-raised from poll/consume
            if self._pending is None:
                self._pending = e
            return -1

    def _live(self, op: str) -> int:
        if not self._rb:
            raise BpfError(errno.EBADF, f"{op} on closed ring buffer of map {self._map.name!r}")
        return self._rb

    def _finish(self, ret: int, op: str) -> int:
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc
        if ret == -errno.EINTR:
            return 0
        return check(ret, f"{op}(map {self._map.name!r})")

    def epoll_fd(self) -> int:
        return lib().ring_buffer__epoll_fd(self._live("epoll_fd"))

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) and consume; returns records handled."""
        return self._finish(lib().ring_buffer__poll(self._live("poll"), timeout_ms),
                            "ring_buffer__poll")

    def consume(self) -> int:
        """Handle whatever is ready without waiting (use after epoll readiness)."""
        return self._finish(lib().ring_buffer__consume(self._live("consume")),
                            "ring_buffer__consume")

    def close(self) -> None:
        if self._rb:
            lib().ring_buffer__free(self._rb)
            self._rb = None

