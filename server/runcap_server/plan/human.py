"""Is this a named human? Seed 002's rule for the on-call field of a plan.

"You need a named human, not a team alias. Someone whose name is on the page
is much more motivated to configure quota limits correctly." A rotation, a
channel, a group mailbox or a team handle are all ways for nobody in
particular to be paged. The checks are deliberately simple and explainable:

- a name is a person's full name: at least two words of letters (hyphens,
  apostrophes and periods allowed, as in "Mary-Jane O'Neil" or "J. R. Smith"),
  with none of the words that mark an alias ("team", "on-call", "ops", ...)
  and not the owning team's name;
- an email's local part is not a role or group mailbox ("oncall@",
  "data-platform@", "sre-alerts@");
- a Slack handle is a person's ("@priya.raman" or a member id like
  "U024BE7LH"), not "@channel", "@here", a #channel or a user group.

Each function returns None for a value that passes, or a sentence that says
what is wrong with it.
"""

from __future__ import annotations

import itertools
import re
from typing import Final

# Words that make a name, email or handle an alias rather than a person.
# Matched as whole words, case-insensitively; "on call" also as two words.
ALIAS_WORDS: Final = frozenset(
    {
        "admin",
        "admins",
        "alert",
        "alerting",
        "alerts",
        "backup",
        "bot",
        "channel",
        "crew",
        "devops",
        "engineering",
        "escalation",
        "everyone",
        "group",
        "helpdesk",
        "here",
        "incident",
        "incidents",
        "infra",
        "monitoring",
        "nobody",
        "none",
        "oncall",
        "ops",
        "pager",
        "pagerduty",
        "platform",
        "primary",
        "rotation",
        "roster",
        "secondary",
        "sre",
        "squad",
        "staff",
        "support",
        "tbd",
        "team",
        "todo",
        "unknown",
    }
)
# Mailbox local parts that are roles or lists, beyond the alias words (these
# are also given names or surnames, so they are not refused in a name).
MAILBOX_WORDS: Final = ALIAS_WORDS | {
    "all",
    "billing",
    "contact",
    "dev",
    "devs",
    "eng",
    "help",
    "hello",
    "info",
    "it",
    "list",
    "noreply",
    "notifications",
    "reply",
    "security",
}
# Letters, joined by an apostrophe (straight or typographic), a period or a hyphen.
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019.-][^\W\d_]+)*\.?")
_EMAIL = re.compile(r"([^@\s]+)@([^@\s]+\.[^@\s]+)")
_HANDLE = re.compile(r"@?([a-z0-9][a-z0-9._-]{0,79})")
_MEMBER_ID = re.compile(r"[UW][A-Z0-9]{6,}")
_EXAMPLE: Final = "give the full name of the person who is paged, such as 'Priya Raman'"


def _tokens(text: str) -> list[str]:
    return [token for token in re.split(r"[^a-z]+", text.lower()) if token]


def _alias_word(text: str, words: frozenset[str], team: str) -> str | None:
    """The first alias word in `text`, or the team's name if it appears."""
    tokens = _tokens(text)
    for first, second in itertools.pairwise(tokens):
        if (first, second) in {("on", "call"), ("no", "reply")}:
            return f"{first}-{second}"
    for token in tokens:
        if token in words:
            return token
    # The team's name as whole words ("data-platform" in "data.platform.pager").
    size = len(team_tokens := _tokens(team))
    if size and any(tokens[i : i + size] == team_tokens for i in range(len(tokens))):
        return team
    return None


def name_problem(name: str, team: str) -> str | None:
    """Why `name` is not a person's full name, or None."""
    text = " ".join(name.split())
    if not text:
        return f"is empty: {_EXAMPLE}"
    alias = _alias_word(text, ALIAS_WORDS, team)
    if alias is not None:
        return (
            f"{name!r} is an alias ({alias!r}), not a named human: {_EXAMPLE}. A rotation or "
            "a team is nobody in particular at 3am (seed 002)"
        )
    words = text.split(" ")
    if not all(_WORD.fullmatch(word) for word in words):
        return (
            f"{name!r} is not a person's name (letters, with hyphens, apostrophes or periods; "
            f"no handles, digits or '@'): {_EXAMPLE}"
        )
    if len(words) < 2:
        return f"{name!r} is one word: {_EXAMPLE} (given name and family name)"
    return None


def email_problem(email: str, team: str) -> str | None:
    """Why `email` is not a person's own address, or None."""
    match = _EMAIL.fullmatch(email.strip())
    if match is None:
        return f"{email!r} is not an email address"
    local = match.group(1)
    alias = _alias_word(local, MAILBOX_WORDS, team)
    if alias is not None:
        return (
            f"{email!r} is a group or role mailbox ({alias!r}), not a person's own address: "
            "give the on-call human's email"
        )
    return None


def slack_problem(handle: str, team: str) -> str | None:
    """Why `handle` is not a person's Slack handle or member id, or None."""
    text = handle.strip()
    if text.startswith("#"):
        return f"{handle!r} is a channel, not a person: give the on-call human's Slack handle"
    if _MEMBER_ID.fullmatch(text):
        return None
    match = _HANDLE.fullmatch(text)
    if match is None:
        return f"{handle!r} is not a Slack handle such as '@priya.raman' or a member id"
    name = match.group(1)
    if name in {"channel", "here", "everyone"}:
        return f"{handle!r} notifies a whole channel, not a person"
    alias = _alias_word(name, MAILBOX_WORDS, team)
    if alias is not None:
        return f"{handle!r} is a user group or alias ({alias!r}), not a person's handle"
    return None
