"""`gradmon demo`: a real CPU training run with the agent attached.

Every scenario is a small model trained for real; the faulty ones break through genuine
training dynamics, never through gradients written by hand: healthy, exploding,
vanishing, nonfinite, dead (scenarios.py says how each one breaks).

`run_demo()` serves /metrics while it runs, shows a live view in a terminal (progress
lines otherwise), prints a summary and returns what gradmon detected.

With `with_prometheus=True` (`gradmon demo --with-prometheus`) a local Prometheus and
Alertmanager (gradmon.tools.localstack) run beside the training: Prometheus scrapes the run
every second and evaluates the alert rules, Alertmanager delivers to a webhook that
prints what it receives. The faulty scenarios finish in a second or two, far less than
the rules' `for` durations: `step_delay` paces the loop (each step lasts at least that
long), by default spreading a run over about PACED_SECONDS.

One job a module: scenarios.py (what is trained), loop.py (the training loop and its
tally), view.py (live view, progress lines, summary), stack.py (--with-prometheus),
run.py (run_demo: the parts put together).
"""

from gradmon.tools.demo.loop import DemoResult
from gradmon.tools.demo.run import PACED_SECONDS, run_demo
from gradmon.tools.demo.scenarios import DEFAULT_STEPS, DESCRIPTIONS, SCENARIOS
from gradmon.tools.demo.view import summary

__all__ = [
    "DEFAULT_STEPS",
    "DESCRIPTIONS",
    "PACED_SECONDS",
    "SCENARIOS",
    "DemoResult",
    "run_demo",
    "summary",
]
