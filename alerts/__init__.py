"""E-mail alert worker: consumes ``arb.opportunities`` and e-mails episodes that match rules.

Modules: :mod:`alerts.rules` (which events match which rule), :mod:`alerts.message` (the
multipart e-mail), :mod:`alerts.smtp` (transport with retries), :mod:`alerts.log` (MongoDB
claims and decision log), :mod:`alerts.worker` (the Kafka consumer loop), :mod:`alerts.cli`
(``arbstream alerts ...``). See ``alerts/README.md``.
"""
