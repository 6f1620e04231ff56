"""Which alerts a run's change raises, rule by rule: a pure function of the
change and of the little the follower remembers about the run (`RunMemory`,
saved with its cursor so a restart resumes with the same answers).

Each alert is named by its crossing, so the same change always raises the
same alert ids (engine.alert_id):

- threshold crossings (info, warn, throttle): the level; a run crosses each
  level once;
- stop: the change that put the run at its wall (THRESHOLD_LEVEL_STOP, or
  EVENT_TYPE_BLOCKED); then no other stop alert until a Reserve holds money
  again (EVENT_TYPE_RESERVED, which is also when the ledger un-marks
  `blocked`), so a loop of blocked calls is one alert;
- suspended: the SUSPENDED change; approval requested: the approval id;
  overrun: the reservation;
- burn rate: the commit that took the trailing minute's spend above the
  rule's rate; no other until it fell back to or below it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from runcap_server.alerts.rules import Rule, Trigger
from runcap_server.ledger.types import Change, EventType, Threshold, approval_id

WINDOW_S = 60


@dataclass(frozen=True, slots=True)
class Signal:
    """One alert to raise for one rule."""

    rule: Rule
    trigger: Trigger
    # The crossing's identity within the run (part of the alert id).
    identity: str
    # What the rate limit counts per run: the trigger, and a threshold's level.
    rate_key: str
    threshold: Threshold = Threshold.NONE
    details: dict[str, str | int] = field(default_factory=dict)


@dataclass(slots=True)
class RunMemory:
    """What the follower keeps about a run between changes."""

    # A stop alert was raised and no Reserve has held money since.
    stopped: bool = False
    # Committed micro-USD per second (unix seconds), the trailing minute only.
    burn: dict[int, int] = field(default_factory=dict)
    # Rules whose burn rate the run is above (alerted once per excursion).
    burning: set[str] = field(default_factory=set)

    def encode(self) -> str:
        return json.dumps(
            {"s": self.stopped, "b": self.burn, "r": sorted(self.burning)},
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def decode(cls, text: str) -> RunMemory:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(raw["s"], {int(k): v for k, v in raw["b"].items()}, set(raw["r"]))

    def _burn_rate(self, now_s: int) -> int:
        for second in [s for s in self.burn if s <= now_s - WINDOW_S]:
            del self.burn[second]
        return sum(self.burn.values())


def _level_trigger(level: Threshold) -> Trigger:
    return Trigger.THROTTLE if level is Threshold.THROTTLE else Trigger.THRESHOLD


def evaluate(change: Change, memory: RunMemory, rules: Iterable[Rule]) -> list[Signal]:
    """The alerts `change` raises for `rules` (already matched to the run),
    updating `memory`. Rules ignore changes from before they were stored."""
    run_id = change.state.run_id
    found: list[tuple[Trigger, str, str, Threshold, dict[str, str | int]]] = []
    kind = change.type
    if kind is EventType.THRESHOLD_CROSSED:
        level = change.threshold
        if level is Threshold.STOP:
            if not memory.stopped:
                memory.stopped = True
                found.append((Trigger.STOP, f"stop@{change.revision}", "stop", level, {}))
        elif level is not Threshold.NONE:
            trigger = _level_trigger(level)
            key = f"{trigger.slug}:{int(level)}"
            found.append((trigger, f"threshold:{int(level)}", key, level, {}))
    elif kind is EventType.BLOCKED:
        if not memory.stopped:
            memory.stopped = True
            details: dict[str, str | int] = {"reservation_id": change.reservation_id}
            if change.reason is not None:
                details["reason"] = change.reason.name.lower()
            if change.blocking_scope is not None:
                details["blocking_scope"] = change.blocking_scope.token
            found.append((Trigger.STOP, f"stop@{change.revision}", "stop", Threshold.NONE, details))
    elif kind is EventType.RESERVED:
        memory.stopped = False
    elif kind is EventType.SUSPENDED:
        found.append(
            (Trigger.SUSPENDED, f"suspended@{change.revision}", "suspended", Threshold.NONE, {})
        )
    elif kind is EventType.APPROVAL_REQUESTED:
        approval = approval_id(run_id, change.approval)
        found.append(
            (
                Trigger.APPROVAL_REQUESTED,
                f"approval:{approval}",
                "approval_requested",
                Threshold.NONE,
                {"approval_id": approval, "reservation_id": change.reservation_id},
            )
        )
    elif kind is EventType.COMMITTED and change.overrun_micros > 0:
        found.append(
            (
                Trigger.OVERRUN,
                f"overrun:{change.reservation_id}",
                "overrun",
                Threshold.NONE,
                {
                    "reservation_id": change.reservation_id,
                    "overrun_micros": change.overrun_micros,
                    "actual_micros": change.actual_micros,
                    "late": int(change.late),
                },
            )
        )
    signals = [
        Signal(rule, trigger, identity, key, level, details)
        for trigger, identity, key, level, details in found
        for rule in rules
        if trigger in rule.triggers and change.time_ms >= rule.since_ms
    ]
    if kind is EventType.COMMITTED:
        signals += _burn(change, memory, rules)
    return signals


def _burn(change: Change, memory: RunMemory, rules: Iterable[Rule]) -> list[Signal]:
    now_s = change.time_ms // 1000
    before = memory._burn_rate(now_s)
    memory.burn[now_s] = memory.burn.get(now_s, 0) + change.actual_micros
    after = before + change.actual_micros
    signals = []
    for rule in rules:
        if Trigger.BURN_RATE not in rule.triggers:
            continue
        limit = rule.burn_rate_micros_per_minute
        if before <= limit:
            memory.burning.discard(rule.rule_id)
        if after > limit and rule.rule_id not in memory.burning:
            memory.burning.add(rule.rule_id)
            if change.time_ms >= rule.since_ms:
                details: dict[str, str | int] = {
                    "burn_micros_per_minute": after,
                    "burn_rate_micros_per_minute": limit,
                }
                signals.append(
                    Signal(
                        rule,
                        Trigger.BURN_RATE,
                        f"burn@{change.revision}",
                        "burn_rate",
                        details=details,
                    )
                )
    return signals
