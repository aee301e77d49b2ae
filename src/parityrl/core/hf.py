"""One transformers model built at a time in this process.

transformers builds a model under patches of process-wide state: `from_pretrained` replaces
`PreTrainedModel.tie_weights` (and torch's init functions) for the duration and puts back what it
found. Two threads building at once interleave those patches, and the one that leaves last puts
back the other's no-op: every model built afterwards in the process has untied embeddings
(measured: four reward-model references loaded in parallel left `tie_weights` a no-op, and a
tied model saved later carried a random `lm_head`). Every load parityrl runs off the main thread
(the reward models' references, the trainer thread's float64 copies and checkpoint layouts)
holds this lock, and so do the loads beside them.
"""

from __future__ import annotations

import threading

BUILDING_MODEL = threading.RLock()  # re-entrant: a load may build another inside it
