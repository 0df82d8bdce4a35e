"""`gradmon demo`: a real CPU training run with the agent attached.

Every scenario is a small model trained for real; the faulty ones break through genuine
training dynamics, never through gradients written by hand: healthy, exploding,
vanishing, nonfinite, dead (scenarios.py says how each one breaks).

`run_demo()` serves /metrics while it runs, shows a live view in a terminal (progress
lines otherwise), prints a summary and returns what gradmon detected.

With `with_prometheus=True` (`gradmon demo --with-prometheus`) a local Prometheus and
Alertmanager (gradmon.tools.localstack) run beside the training: Prometheus scrapes the run
every second and evaluates the production alert rules with every `for` and window 60x
shorter (rules.py), Alertmanager delivers to a webhook; alerts.py follows their state for
the view and the summary, and the run waits (bounded) for its scenario's alert to be
delivered. The faulty scenarios finish in a second or two: `step_delay` paces the loop
(each step lasts at least that long), by default spreading a run over about PACED_SECONDS.

One job a module: scenarios.py (what is trained), loop.py (the training loop and its
tally), view.py (live view, progress lines, summary), rules.py (the demo's time-scaled
rules), alerts.py (the run's alerts), stack.py (--with-prometheus), run.py (run_demo: the
parts put together).
"""

from gradmon.tools.demo.loop import DemoResult
from gradmon.tools.demo.rules import EXPECTED_ALERTS
from gradmon.tools.demo.run import ALERT_WAIT_SECONDS, PACED_SECONDS, run_demo
from gradmon.tools.demo.scenarios import DEFAULT_STEPS, DESCRIPTIONS, SCENARIOS
from gradmon.tools.demo.view import summary

__all__ = [
    "ALERT_WAIT_SECONDS",
    "DEFAULT_STEPS",
    "DESCRIPTIONS",
    "EXPECTED_ALERTS",
    "PACED_SECONDS",
    "SCENARIOS",
    "DemoResult",
    "run_demo",
    "summary",
]
