"""A local Prometheus and Alertmanager on loopback, for `gradmon demo --with-prometheus`
and the end-to-end tests.

    with LocalStack(["deploy/prometheus/rules/gradmon.rules.yml"],
                    targets=[Target("127.0.0.1:9400", job="gradmon")],
                    webhook_url=receiver.url) as stack:
        print(stack.prometheus_url, stack.alertmanager_url)

Both servers listen on 127.0.0.1 only, on free ports, with their storage in a temporary
directory that is removed on stop. Prometheus scrapes every `scrape_interval` (1 s by
default, far shorter than a production setup: a demo run lasts seconds to minutes) and
evaluates the rules as often; its targets come from a file_sd directory, so targets can
be added and removed while it runs (`set_target`, `remove_target`), which picks them up
within about 10 s (Prometheus throttles discovery updates to one per 5 s twice over).
Alertmanager routes every alert to one webhook (or nowhere) with short group timers.

The processes are stopped by `stop()`, the context manager, or at interpreter exit
(atexit), whichever comes first: terminate, wait, kill.

`WebhookReceiver` is an HTTP server on 127.0.0.1 that collects the JSON Alertmanager POSTs.
`Pushgateway` runs a Pushgateway (exporter.push) that Prometheus scrapes when its address
is given as `LocalStack(pushgateways=[...])` (job `pushgateway`, honor_labels: true).
"""

from gradmon.tools.localstack.common import (
    LOOPBACK,
    LocalStackError,
    MissingBinaryError,
    Target,
    find_binary,
    http_json,
)
from gradmon.tools.localstack.pushgateway import Pushgateway
from gradmon.tools.localstack.stack import LocalStack
from gradmon.tools.localstack.webhook import WebhookReceiver

__all__ = [
    "LOOPBACK",
    "LocalStack",
    "LocalStackError",
    "MissingBinaryError",
    "Pushgateway",
    "Target",
    "WebhookReceiver",
    "find_binary",
    "http_json",
]
