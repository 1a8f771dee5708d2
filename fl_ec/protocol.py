"""Message keys shared by the ServerApp's strategies and the ClientApp.

A ``query`` message whose config holds ``DESCRIBE_KEY=True`` asks a node who it is: the
ClientApp answers with a ``NODE_INFO_KEY`` config record holding its ``partition-id``
and its training partition's ``class-counts``. The server cannot read a node's
``node_config``, so seeded client sampling (:mod:`fl_ec.strategies.sampling`) learns
the node -> partition map this way.
"""

DESCRIBE_KEY = "describe"
NODE_INFO_KEY = "node-info"
PARTITION_ID_KEY = "partition-id"
CLASS_COUNTS_KEY = "class-counts"
