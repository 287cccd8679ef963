"""Eight fake CPU devices for the sharding tests; set before jax is first imported.

libtpu (installed for the ahead-of-time TPU compiles) is told not to look for
TPU metadata and to tolerate other processes using it at the same time.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
