"""The hospital's source of randomness for every mechanism differential privacy relies on.

DP-SGD's Gaussian noise and Poisson sampling (:mod:`client.secure_dp`) and the noise of the
evaluation releases (:mod:`client.evaluation`) all draw from a :class:`SecureRandom`: the
ChaCha20 keystream (RFC 8439; OpenSSL's implementation through ``cryptography``) under a
256-bit key read from the operating system's CSPRNG (``os.urandom``). The key exists only in
the hospital's memory, is fresh for every round and every release, and is never stored or
sent. Nothing a coordinator sends (run config, seeds, weights) enters it, and the generator
state cannot be searched: recovering it from released noise means breaking ChaCha20 (2^256
keys), where torch's and numpy's generators (mt19937, PCG64) keep 32 to 128 bits of seed that a
search over released noise recovers (torch's CPU generator keeps only the low 32 bits of
``manual_seed``: about 1.5 core-hours).

How values are made from the keystream (all vectorised, no data-dependent branches):

- ``uint64``: 8 keystream bytes each (little endian).
- Bernoulli(p): ``u < floor(p * 2**64)`` on the 64-bit integers, exact integer comparison; the
  realised probability is at most p and within 2**-64 of it (a smaller sampling rate only
  lowers the privacy cost, so accounting at p stays a valid bound).
- Standard normal: Box-Muller (Box & Muller 1958) in float64 on 53-bit uniforms,
  ``u1 in (0, 1]`` and ``u2 in [0, 1)``. Its values are bounded by ``sqrt(-2 ln 2**-53)`` =
  8.57 standard deviations and lie on float64's grid; callers that release in float32 add the
  noise in float64 and round once (see :mod:`client.secure_dp`).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32  # ChaCha20's 256-bit key
_REKEY_BYTES = 2**36  # well below the 2**38 bytes after which OpenSSL's 32-bit block counter wraps
_TWO_PI = 2.0 * np.pi


class SecureRandom:
    """A cryptographically secure generator: the ChaCha20 keystream under a secret key.

    Parameters
    ----------
    key : bytes, optional
        The 32-byte key. Default: 32 bytes from ``os.urandom`` (the OS CSPRNG). Only tests
        pass a key, to show that the key is the only source of the noise.

    Raises
    ------
    ValueError
        ``key`` is not 32 bytes long.

    Notes
    -----
    Not thread-safe: each round and each release makes its own. After 64 GiB of output the
    generator re-keys itself from its own keystream (the block counter never wraps).
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(KEY_BYTES)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a SecureRandom key has {KEY_BYTES} bytes, got {len(key)}")
        self._rekey(key)

    def _rekey(self, key: bytes) -> None:
        cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)  # counter 0, nonce 0
        self._stream = cipher.encryptor()
        self._used = 0

    def bytes(self, n: int) -> bytes:
        """``n`` keystream bytes."""
        if self._used + n > _REKEY_BYTES:
            self._rekey(self._stream.update(bytes(KEY_BYTES)))
        self._used += n
        return self._stream.update(bytes(n))

    def uint64(self, n: int) -> np.ndarray:
        """``[n] uint64``, uniform on ``[0, 2**64)``."""
        return np.frombuffer(self.bytes(8 * n), dtype="<u8").astype(np.uint64, copy=False)

    def randbits(self, k: int) -> int:
        """A uniform integer of ``k`` bits (``0 <= k <= 64``), e.g. to seed a data augmentation."""
        if not 0 <= k <= 64:
            raise ValueError(f"randbits takes 0 to 64 bits, got {k}")
        return int(self.uint64(1)[0]) >> (64 - k) if k else 0

    def bernoulli(self, p: float, n: int) -> np.ndarray:
        """``[n] bool``, each True with probability ``floor(p * 2**64) / 2**64`` (<= p)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a probability lies in [0, 1], got {p!r}")
        threshold = min(int(p * 2**64), 2**64 - 1)
        if p == 1.0:
            return np.ones(n, dtype=bool)
        return self.uint64(n) < np.uint64(threshold)

    def standard_normal(self, n: int) -> np.ndarray:
        """``[n] float64`` draws of N(0, 1) by Box-Muller on 53-bit uniforms."""
        if n <= 0:
            return np.zeros(0, dtype=np.float64)
        pairs = (n + 1) // 2
        bits = self.uint64(2 * pairs) >> np.uint64(11)  # 53 random bits each
        u1 = (bits[:pairs] + 1.0) * 2.0**-53  # (0, 1]: log(u1) is finite
        u2 = bits[pairs:] * 2.0**-53  # [0, 1)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = _TWO_PI * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


__all__ = ["KEY_BYTES", "SecureRandom"]
