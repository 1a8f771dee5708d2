"""The run machinery around a Flower strategy, whatever the strategy.

The resumable round loop (:mod:`~fl_ec.run.loop`), strategy wrappers in the manner of
Flower's differential-privacy wrappers (:mod:`~fl_ec.run.wrapper`: seeded sampling,
a reply quorum, timed aggregation), the metered ``Grid`` (:mod:`~fl_ec.run.metering`)
and what a strategy reports beyond Flower's result (:mod:`~fl_ec.run.reporting`).
Nothing here knows FedEC: the strategies build on it, the ServerApp assembles it.
"""
