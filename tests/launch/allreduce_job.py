"""A tiny multi-process job: joins via lnfm.train.distributed, reduces a global array, writes JSON.

Each process fills its addressable shards of a global (devices, 3) array with
values derived from the global row index, then every process computes the
sum and the per-column mean over the whole array with one jitted reduction.
"""

import json
import sys
from pathlib import Path

from lnfm.train.distributed import initialize

spec = initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

out_dir = Path(sys.argv[1])
n = jax.device_count()
mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = NamedSharding(mesh, PartitionSpec("data"))
rows = np.arange(n * 3, dtype=np.float32).reshape(n, 3) ** 1.5
global_array = jax.make_array_from_callback((n, 3), sharding, lambda idx: rows[idx])
total, mean = jax.jit(lambda x: (jnp.sum(x), jnp.mean(x, axis=0)),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))(global_array)
result = {"source": spec.source, "process_index": jax.process_index(), "process_count": jax.process_count(),
          "device_count": n, "local_device_count": jax.local_device_count(),
          "sum": float(total), "mean": np.asarray(mean).tolist()}
(out_dir / f"result_{jax.process_index()}.json").write_text(json.dumps(result))
print("done", result["sum"])
