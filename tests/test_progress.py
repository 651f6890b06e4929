"""The observation loops' tokens-per-second figure (reap_fast.observe.progress)."""

from reap_fast.observe.progress import TokenRate


class FakeBar:
    def __init__(self):
        self.postfix, self.steps = {}, 0

    def set_postfix(self, **values):
        self.postfix = values

    def update(self, steps):
        self.steps += steps


def test_token_rate_counts_tokens_over_clock_time_and_restarts():
    now = [10.0]
    rate, bar = TokenRate(clock=lambda: now[0]), FakeBar()
    now[0] = 12.0
    rate.advance(bar, 3000, batch="1/2")
    assert (rate.tokens, bar.steps, bar.postfix) == (3000, 1, {"batch": "1/2", "tok_s": "1,500"})
    now[0] = 14.0
    rate.advance(bar, 1000)
    assert bar.postfix == {"tok_s": "1,000"} and bar.steps == 2
    assert rate.elapsed() == 4.0
    rate.restart()
    now[0] = 14.5
    rate.advance(bar, 100)
    assert (rate.tokens, rate.per_second()) == (100, 200.0)


def test_token_rate_is_finite_when_no_time_passed():
    rate = TokenRate(clock=lambda: 1.0)
    rate.tokens = 5
    assert rate.elapsed() > 0 and rate.per_second() > 0
