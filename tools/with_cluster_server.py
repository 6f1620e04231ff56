"""Run a command against a runcap server on a fresh 3-primary Redis cluster.

    python tools/with_cluster_server.py -- COMMAND ARGS...

Starts Debian's redis-server as a cluster and one runcap server on it, runs the
command with RUNCAP_CONFORMANCE_TARGET set to the server, stops everything,
and exits with the command's code. `make test` runs the Go and TypeScript
conformance drivers this way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.redis_servers import RedisCluster
from tests.servers import ServerProcess


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(__doc__, file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1 :]
    cluster = RedisCluster(primaries=3).start()
    server = ServerProcess(
        None,
        env={
            "RUNCAP_BACKEND": "redis",
            "RUNCAP_REDIS_CLUSTER_NODES": ",".join(cluster.startup_nodes),
        },
    )
    try:
        server.start()
        print(f"runcap on a Redis cluster at {server.target}", flush=True)
        env = {**os.environ, "RUNCAP_CONFORMANCE_TARGET": server.target}
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        server.stop()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
