"""Values the coordinator and the hospitals agree on in their messages (import-light: no torch)."""

from __future__ import annotations

SITE_REFUSED = 4001  # error code of a reply refused by the site: "site NAME refused: <reason>"
SECAGG_FAILED = 4002  # error code when the coordinator could not unmask a SecAgg+ round's sum
# under client-level DP every hospital weighs the same (Flower's accountant requires equal weights)
UNIT_WEIGHT_KEY = "unit-weight"
# retrying an object (model weights) that is announced but still being uploaded, on either side:
# first retry after this many seconds, doubling up to the cap (Flower 1.41's pull: 1 s, 10 s)
OBJECT_RETRY_BACKOFF = 0.05
OBJECT_RETRY_CAP = 1.0
