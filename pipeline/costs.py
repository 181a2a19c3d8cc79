"""What tasks cost, as the service reported it: one task's :class:`Cost`, a run's :class:`Spending`.

A figure the service did not give is None, never 0: "unknown" and "free" are different answers, and
the budget treats an unknown cost as possibly the dearest (``runner``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cost:
    """What one task cost as the service reported it; None where it did not say (never 0)."""

    coins: float | None = None
    money: float | None = None
    third_party_money: float | None = None
    seconds: float | None = None
    children: list[dict[str, Any]] | None = None  # child tasks' usage, as reported

    @classmethod
    def of_outputs(cls, outputs: Sequence[dict[str, Any]]) -> Cost:
        """v1 ``outputs`` repeat the task's cost on every file: the largest figure is the task's."""

        def most(name: str) -> float | None:
            values = [o[name] for o in outputs if o.get(name) is not None]
            return max(values) if values else None

        return cls(most("consumeCoins"), most("consumeMoney"), most("thirdPartyConsumeMoney"),
                   most("taskCostTime"))

    @property
    def known(self) -> bool:
        return self.coins is not None or self.money is not None or self.third_party_money is not None


@dataclass
class Spending:
    """Coins and money billed, per final status, over every attempt of a run."""

    coins: float = 0.0
    money: float = 0.0
    third_party_money: float = 0.0
    by_status: dict[str, dict[str, float]] = field(default_factory=dict)
    unpriced: int = 0  # tasks that ran (they have an id) whose cost the service never reported
    # earlier attempts that ended SUBMIT_UNKNOWN and were resubmitted on the user's consent: each
    # may have been billed, at a cost no answer will ever say
    unknown_attempts: int = 0
    max_coins: float | None = None  # the dearest task so far
    max_money: float | None = None

    def add(self, status: str, n: int, coins: float | None, money: float | None,
            third: float | None, unpriced: int, max_coins: float | None,
            max_money: float | None, *, final: bool) -> None:
        """Count ``n`` tasks that ended ``status`` (``final``: billed, so an unpriced one is a
        cost the service never reported)."""
        bucket = self.by_status.setdefault(
            status, {"tasks": 0, "coins": 0.0, "money": 0.0, "third_party_money": 0.0,
                     "unpriced": 0})
        bucket["tasks"] += n
        bucket["coins"] += coins or 0.0
        bucket["money"] += money or 0.0
        bucket["third_party_money"] += third or 0.0
        bucket["unpriced"] += unpriced
        self.coins += coins or 0.0
        self.money += money or 0.0
        self.third_party_money += third or 0.0
        if final:
            self.unpriced += unpriced
        else:
            bucket["unpriced"] -= unpriced  # live tasks have not been billed yet
        if max_coins is not None:
            self.max_coins = max(self.max_coins or 0.0, max_coins)
        if max_money:
            self.max_money = max(self.max_money or 0.0, max_money)

    @property
    def all_money(self) -> float:
        return self.money + self.third_party_money
