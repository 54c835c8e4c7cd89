"""``python -m service.cluster``: the service on a Ray cluster (see ``service.cluster.app``)."""

import sys

from service.cluster.app import main

sys.exit(main())
