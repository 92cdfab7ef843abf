import os
import sys

# GNU OpenMP reads this once, when torch loads it. Its workers spin between parallel regions for
# GOMP_SPINCOUNT pause instructions (default 300000: about 7 ms on a Zen 5, more on recent Intel
# parts) before they sleep, so after every prefill a worker would keep a core busy while the event
# loop streams the first token and the clients read it; on 2 cores that made the time to first
# token vary from 10 to 17 ms. 10000 spins (a quarter of a millisecond there) still bridge the gaps
# between the regions of one forward. A value (or OMP_WAIT_POLICY) set by the user is kept.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

from .cli import main  # noqa: E402  (after the environment above)

sys.exit(main())
