"""E-mail alert worker: consumes ``arb.opportunities`` and e-mails episodes that match rules.

Modules: :mod:`alerts.rules` (which events match which rule), :mod:`alerts.message` (the
multipart e-mail), :mod:`alerts.scoring` (the champion models: load, hot reload, score),
:mod:`alerts.smtp` (transport with retries), :mod:`alerts.worker` (the Kafka consumer loop),
:mod:`alerts.cli` (``arbstream alerts ...``). Claims and the decision log
are in MongoDB through the store (:mod:`arbstream.store.mongo.alert_log`). See
``alerts/README.md``.
"""
