"""Reply styles: the preset table, how a preset and a user's system prompt combine, the temperature range."""
import pytest

from tinyhun.errors import TinyhunError
from tinyhun.styles import DEFAULT_TEMPERATURE, STYLES, check_temperature, style_prompt, system_prompt


def test_the_three_styles_exist_and_differ():
    assert {"formal", "casual", "friendly"} <= set(STYLES)
    assert len(set(STYLES.values())) == len(STYLES) and all(STYLES.values())
    assert style_prompt("formal") == STYLES["formal"]


def test_unknown_style_names_the_known_ones():
    with pytest.raises(TinyhunError, match="unknown style 'rude': expected one of casual, formal, friendly"):
        style_prompt("rude")


@pytest.mark.parametrize("style, system, want", [
    (None, None, None),
    (None, "", None),
    ("casual", None, STYLES["casual"]),
    (None, "You sell bikes.", "You sell bikes."),
    ("formal", "You sell bikes.", STYLES["formal"] + "\n\nYou sell bikes."),
])
def test_system_prompt_puts_the_preset_first(style, system, want):
    assert system_prompt(style, system) == want


def test_temperature_range():
    assert DEFAULT_TEMPERATURE == 0.3 and check_temperature(DEFAULT_TEMPERATURE) == 0.3
    assert check_temperature("0.1") == 0.1 and check_temperature(1) == 1.0 and check_temperature(0) == 0.0
    for bad in (0.05, 1.5, -1, "warm", float("nan")):
        with pytest.raises(TinyhunError, match="expected 0 \\(greedy\\) or a number from 0.1 to 1.0"):
            check_temperature(bad)
    with pytest.raises(TinyhunError, match="expected a number from 0.1 to 1.0"):
        check_temperature(0, allow_greedy=False)
