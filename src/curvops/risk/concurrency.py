"""One process-wide lock that serialises the passes over the data (products from threads).

NOTE [threads]: operators may be used from several threads at once (e.g. a thread pool that
multiplies several vectors), and the results equal those of single-threaded products. The
passes over the data are *serialised*, not run in parallel, because

* PyTorch's forward-mode autodiff keeps its dual levels process-wide (two threads entering
  ``torch.autograd.forward_ad.dual_level`` at once fail with "Nested forward mode AD is not
  supported"), and GGN, Fisher and Jacobian products use forward mode;
* a pass uses state of the operator and the model: the Monte-Carlo Fisher re-seeds its
  generator before each pass, KFAC records the calls of its layers in the model, and the
  buffer guard (NOTE [module buffers]) restores the model's buffers after every batch.

So a pass holds :data:`DATA_PASS_LOCK` from before its first batch to after its last. The
lock is re-entrant: a pass may start others in the same thread (the determinism check
multiplies inside the constructor). PyTorch parallelises each operation internally, so
threads gain little here anyway. Products of KFAC and EKFAC after their factors are computed
use no data and run concurrently.
"""

from __future__ import annotations

import threading

DATA_PASS_LOCK = threading.RLock()
"""Held by a thread for the whole of each pass over the data (NOTE [threads])."""
