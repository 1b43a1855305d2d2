"""Deadlines in setting order."""
from realplexor.deadlines import Deadlines


def test_pop_due_in_order_and_only_what_is_due():
    due = Deadlines()
    due.set("a", 1)
    due.set("b", 2)
    due.set("c", 3)
    assert list(due.pop_due(2)) == ["a", "b"]
    assert list(due) == ["c"] and len(due) == 1


def test_setting_again_moves_a_key_back():
    due = Deadlines()
    due.set("a", 1)
    due.set("b", 2)
    due.set("a", 3)
    assert list(due.pop_due(2)) == ["b"]
    assert due.get("a") == 3


def test_cancel():
    due = Deadlines()
    due.set("a", 1)
    assert due.cancel("a") is True
    assert due.cancel("a") is False
    assert list(due.pop_due(10)) == [] and "a" not in due
