"""Reading the old daemon's Perl configuration files as data, and refusing the rest."""
from __future__ import annotations

import pytest

from realplexor.perlconfig import PerlConfigError, Setting, read_settings

MAIN = """\
##
## Default configuration file. Do not modify it!
##
%CONFIG = (
    # After starting and opening ports, switch to this user and his group.
    SU_USER => "nobody",
    WAIT_MAXLEN => 1024 * 5,
    CLEAN_ID_AFTER => 60 * 60,   # an hour
    WAIT_ADDR => [
        '0.0.0.0:8088',
        # more addresses here
    ],
    IN_ADDR => [ '127.0.0.1:10010' ],
    HOOK_CHECK_VISIBILITY => undef,
    JS_WAIT_RECONNECT_DELAY => 0.01,
    'CHARSET' => 'utf-8',
    "IDENTIFIER" => "identifier",
);

return 1;
"""

OVERRIDE = """\
# Site settings.
$CONFIG{WAIT_ADDR} = [ "0.0.0.0:80" ];   # public
$CONFIG{'SU_USER'} = undef;
$CONFIG{LOGGER} = 'syslog';
"""


def values(settings: dict[str, Setting]) -> dict:
    return {name: setting.value for name, setting in settings.items()}


def test_main_file_form():
    settings = read_settings(MAIN, source="main.conf")
    assert values(settings) == {
        "SU_USER": "nobody", "WAIT_MAXLEN": 5120, "CLEAN_ID_AFTER": 3600,
        "WAIT_ADDR": ["0.0.0.0:8088"], "IN_ADDR": ["127.0.0.1:10010"],
        "HOOK_CHECK_VISIBILITY": None, "JS_WAIT_RECONNECT_DELAY": 0.01,
        "CHARSET": "utf-8", "IDENTIFIER": "identifier",
    }
    assert settings["WAIT_ADDR"] == Setting("WAIT_ADDR", ["0.0.0.0:8088"], 9, "main.conf")
    assert settings["CHARSET"].line == 16


def test_override_form_applies_over_earlier_settings_in_order():
    settings = read_settings(OVERRIDE, read_settings(MAIN, source="main.conf"), "local.conf")
    assert settings["WAIT_ADDR"] == Setting("WAIT_ADDR", ["0.0.0.0:80"], 2, "local.conf")
    assert settings["SU_USER"] == Setting("SU_USER", None, 3, "local.conf")
    assert settings["LOGGER"].value == "syslog"
    assert list(settings)[:4] == ["SU_USER", "WAIT_MAXLEN", "CLEAN_ID_AFTER", "WAIT_ADDR"]
    assert settings["IN_ADDR"].source == "main.conf"


def test_whole_hash_assignment_replaces_what_came_before():
    earlier = read_settings(MAIN)
    settings = read_settings("%CONFIG = (VERBOSITY => 1);", earlier)
    assert values(settings) == {"VERBOSITY": 1}
    assert "SU_USER" in earlier


@pytest.mark.parametrize("perl, value", [
    ("42", 42),
    ("-5", -5),
    ("1_000", 1000),
    ("0.5", 0.5),
    (".25", 0.25),
    ("1e3", 1000.0),
    ("2 * 1024 * 1024", 2097152),
    ("0.5 * 3", 1.5),
    ("'a\\'b\\\\c\\d'", "a'b\\c\\d"),
    ('"tab\\there \\"q\\" \\$x \\@y"', 'tab\there "q" $x @y'),
    ("'a # not a comment'", "a # not a comment"),
    ('"user@"', "user@"),
    ("'$HOME @x'", "$HOME @x"),
    ("[]", []),
    ("[1, 'two', 3.5,]", [1, "two", 3.5]),
    ("undef", None),
])
def test_values(perl, value):
    assert read_settings(f"$CONFIG{{X}} = {perl};")["X"].value == value


def test_last_statement_needs_no_semicolon_and_empty_statements_pass():
    assert values(read_settings(";;\n$CONFIG{A} = 1;\n1;\n")) == {"A": 1}
    assert values(read_settings("$CONFIG{A} = 1")) == {"A": 1}
    assert values(read_settings("$CONFIG{A} = 1;\nreturn;")) == {"A": 1}
    assert read_settings("# only comments\n") == {}


@pytest.mark.parametrize("text, line, message", [
    ("$CONFIG{HOOK_CHECK_VISIBILITY} = sub { return 1 };", 1, "`sub` is Perl code"),
    ("%CONFIG = (\n  USERS_FILE => $ENV{HOME},\n);", 2, "the variable `$ENV` is not understood"),
    ("$CONFIG{USERS_FILE} = $root . '/users';", 1, "the variable `$root`"),
    ("$CONFIG{USERS_FILE} = '/etc/' . 'users';", 1, "string concatenation (`.`) is not understood"),
    ("$CONFIG{WAIT_ADDR} = join(',', 1);", 1, "`join(...)` is Perl code"),
    ("$CONFIG{WAIT_ADDR} = qw(a b);", 1, "`qw(...)` is Perl code"),
    ("$CONFIG{CHARSET} = utf8;", 1, "the bareword `utf8` is not a value: put strings in quotes"),
    ("%CONFIG = (\n  CHARSET => 'utf-8,\n);", 2, "unterminated string"),
    ('$CONFIG{CHARSET} = "utf-8;', 1, "unterminated string"),
    ('$CONFIG{SU_USER} = "$user";', 1, "interpolates a Perl variable"),
    ('$CONFIG{SU_USER} = "a@b.c";', 1, "interpolates a Perl variable"),
    ('$CONFIG{SU_USER} = "\\x41";', 1, "the escape \\x in a double-quoted string is not understood"),
    ("$CONFIG{MAX_MEM_MB} = 0x100;", 1, "write numbers in decimal"),
    ("$CONFIG{MAX_MEM_MB} = 0100;", 1, "octal"),
    ("$CONFIG{MAX_MEM_MB} = 100 + 28;", 1, "`+` is not understood: only `*` between numbers is"),
    ("$CONFIG{MAX_MEM_MB} = 'a' * 2;", 1, "only numbers can be multiplied"),
    ("$CONFIG{MAX_MEM_MB} = 2 * 'a';", 1, "only numbers can be multiplied"),
    ("$CONFIG{WAIT_ADDR} = [['a']];", 1, "not undef or another list"),
    ("$CONFIG{WAIT_ADDR} = ['a' 'b'];", 1, "expected `,` or `]` in the list"),
    ("%CONFIG = (\n  A => 1\n  B => 2,\n);", 3, "expected `,` or `)` after the value of A"),
    ("%CONFIG = (\n  A, 1,\n);", 2, "expected `=>` after A"),
    ("%CONFIG = (\n  A => 1,\n", 3, "the file ends inside the %CONFIG list of line 1"),
    ("$CONFIG{A} = [\n 1,\n", 3, "the file ends inside the list opened on line 1"),
    ("$CONFIG{A} = 'it''s';", 1, "expected `;` at the end of the statement, found the string 's'"),
    ("$CONFIG{A} = 1 $CONFIG{B} = 2;", 1, "expected `;` at the end of the statement"),
    ("use strict;\n", 1, "`use` where a statement should start"),
    ("our %CONFIG;\n", 1, "`our` where a statement should start"),
    ("$CONFIG{A} = <<EOF;\n", 1, "unexpected character '<'"),
    ("$config{A} = 1;", 1, "`$config` where a statement should start"),
    ("$CONFIG{A} = {};", 1, "`{` where a value should be"),
    ("$CONFIG{A} = 1;\nreturn 1;\n$CONFIG{B} = 2;\n", 3, "after `return`: Perl would never read it"),
    ("$CONFIG{A} =", 1, "the file ends where a value should be"),
    ("$CONFIG{A} = '\udcff';", 1, "not UTF-8 text"),
])
def test_refused_with_the_line(text, line, message):
    with pytest.raises(PerlConfigError) as caught:
        read_settings(text)
    assert caught.value.line == line
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"line {line}: ")


def test_nothing_is_applied_from_a_refused_file():
    earlier = read_settings("$CONFIG{A} = 1;")
    with pytest.raises(PerlConfigError):
        read_settings("$CONFIG{A} = 2;\n$CONFIG{B} = sub {};", earlier)
    assert values(earlier) == {"A": 1}
