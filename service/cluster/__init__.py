"""The service on a Ray cluster: the head (``app``, ``pool``) and the gang members (``member``)."""
