import sys

from runcap_server.cli import main

sys.exit(main())
