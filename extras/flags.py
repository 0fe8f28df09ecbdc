"""Numeric flags: every script states the range of each of its numeric flags in one table, and
`parse` checks them right after parsing, before any slow work.

    RANGES = {"lr": "(0, inf)", "k": "[1, inf)", "max_norm_ratio": "0 or (1, inf)"}
    args = flags.parse(parser, argv, RANGES)

A range is intervals in the usual notation (`[` closed, `(` open), or single values, joined by
` or `. The range is added to each flag's help; a value outside it (any element of a list) is
one line naming the flag, the value and the range (a ValueError: the scripts exit 2). A numeric
flag missing from the table is a programming error, so no flag goes unchecked. None (a default
left to a rule) is not checked.
"""
import math
import re


def csv(kind):
    """An argparse type: a comma list of kind, e.g. `--expansion 8,32`."""
    def parse(text):
        return [kind(v) for v in text.split(",")]
    parse.kind = kind
    return parse


def kind(action):
    """int or float for a numeric flag (a single value or a `csv` list), else None."""
    return action.type if action.type in (int, float) else getattr(action.type, "kind", None)


def intervals(text):
    """[(lo, hi, lo_closed, hi_closed)] of a range's text."""
    out = []
    for part in text.split(" or "):
        m = re.fullmatch(r"([\[(])\s*(\S+),\s*(\S+)\s*([\])])", part.strip())
        if m:
            out.append((float(m[2]), float(m[3]), m[1] == "[", m[4] == "]"))
        else:
            out.append((float(part),) * 2 + (True, True))
    return out


def inside(value, text):
    return any((lo <= value if a else lo < value) and (value <= hi if b else value < hi)
               for lo, hi, a, b in intervals(text))


def parse(parser, argv, ranges):
    """parser.parse_args(argv), each numeric flag's range (ranges: dest -> range) stated in its
    help and checked."""
    acts = [a for a in parser._actions if kind(a)]
    missing = [a.dest for a in acts if a.dest not in ranges]
    assert not missing, f"numeric flags without a range: {missing}"
    for a in acts:
        a.help = f"{a.help or ''} [range {ranges[a.dest]}]".lstrip()
    args = parser.parse_args(argv)
    for a in acts:
        value = getattr(args, a.dest)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and (math.isnan(v) or not inside(v, ranges[a.dest])):
                raise ValueError(f"{a.option_strings[0]} {v} is out of range: allowed "
                                 f"{ranges[a.dest]}")
    return args
