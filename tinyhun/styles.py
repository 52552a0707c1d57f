"""Reply styles for customer-service chat: each a system-prompt preset, kept in this one table.

A style sets the tone; a user's own system prompt (`--system`, `/system TEXT`) adds the specifics (the shop, the
product, the rules). When both are given the style preset comes first and the user's text follows after a blank
line, so the more specific instruction is the one the model reads last.
"""
from .errors import TinyhunError

STYLES: dict[str, str] = {
    "formal": ("You are a customer service assistant. Reply in a formal, courteous and precise register: address "
               "the customer politely, avoid slang and jokes, state facts and next steps clearly, and keep replies "
               "concise."),
    "casual": ("You are a customer service assistant. Reply in a relaxed, conversational way, as a helpful "
               "colleague would: plain words, short sentences, no stiff phrasing, while staying accurate and "
               "respectful."),
    "friendly": ("You are a customer service assistant. Reply warmly and with empathy: acknowledge how the "
                 "customer feels, be encouraging and patient, and make sure they know what to do next."),
}

# Customer-service replies should be predictable, so the chat samples cooler by default than the 0.7 of Tencent's
# recommended sampling settings. A user may choose 0.1-1.0: below it sampling is all but greedy, above it the
# distribution is flattened past the model's own (0 stays allowed for deterministic tests: check_temperature).
DEFAULT_TEMPERATURE = 0.3
TEMPERATURE_RANGE = (0.1, 1.0)


def style_prompt(name: str) -> str:
    """The system-prompt preset of style `name`; a TinyhunError naming the known styles otherwise."""
    try:
        return STYLES[name]
    except (KeyError, TypeError):
        raise TinyhunError(f"unknown style {name!r}: expected one of {', '.join(sorted(STYLES))}") from None


def system_prompt(style: str | None = None, system: str | None = None) -> str | None:
    """The system prompt for a style preset and/or a user's system text (empty text counts as none): the preset,
    then a blank line, then the user's text; None when there is neither."""
    parts = [style_prompt(style) if style else None, system or None]
    parts = [p for p in parts if p]
    return "\n\n".join(parts) if parts else None


def check_temperature(value: float, allow_greedy: bool = True) -> float:
    """value as a float in TEMPERATURE_RANGE (0 too when allow_greedy: deterministic replies, for tests and
    reproducible transcripts); else a TinyhunError saying what was expected."""
    lo, hi = TEMPERATURE_RANGE
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (lo <= t <= hi or (allow_greedy and t == 0)):
        zero = "0 (greedy) or " if allow_greedy else ""
        raise TinyhunError(f"temperature {value!r}: expected {zero}a number from {lo} to {hi}")
    return t
