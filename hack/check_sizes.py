#!/usr/bin/env python3
"""Keeps the code in pieces a reader can hold: no Rust source file over 800
lines outside tests (a trailing `#[cfg(test)] mod tests` block does not
count, nor do files of tests) and no function over 100 lines, tests
included. Prints each one over and exits 1; silent and 0 when none is.

    hack/check_sizes.py [DIR]

A function is counted from its `fn` line to the brace that closes it,
matched by counting braces (brace characters inside strings or comments are
rare here; a miscount shows as a function far too long, which the list
makes plain)."""

import re
import sys
from pathlib import Path

MAX_FILE_LINES = 800
MAX_FN_LINES = 100
SKIP_DIRS = {"target", "build", ".git", "corpus", "artifacts"}
FN = re.compile(r'\s*(pub(\([^)]*\))?\s+)?(const\s+)?(unsafe\s+)?(async\s+)?(extern "C"\s+)?fn\s+(\w+)')


def is_test_file(rel):
    parts = rel.parts
    return "tests" in parts[:-1] or rel.name == "tests.rs"


def code_lines(lines):
    """Lines before a trailing `#[cfg(test)] mod tests` block."""
    for i, line in enumerate(lines[:-1]):
        if line.startswith("#[cfg(test)]") and lines[i + 1].startswith("mod tests"):
            return i
    return len(lines)


def function_end(lines, start):
    """The index of the line that closes the function starting at `start`,
    or None for a declaration without a body."""
    depth, opened = 0, False
    for j in range(start, len(lines)):
        for ch in lines[j]:
            if ch == "{":
                depth, opened = depth + 1, True
            elif ch == "}":
                depth -= 1
        if opened and depth == 0:
            return j
        if not opened and lines[j].rstrip().endswith(";"):
            return None
    return None


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    over = []
    for path in sorted(root.rglob("*.rs")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        lines = path.read_text().split("\n")
        n = code_lines(lines)
        if n > MAX_FILE_LINES and not is_test_file(rel):
            over.append(f"{rel}: {n} lines outside tests (at most {MAX_FILE_LINES})")
        for i, line in enumerate(lines):
            m = FN.match(line)
            if not m:
                continue
            end = function_end(lines, i)
            if end is not None and end - i + 1 > MAX_FN_LINES:
                over.append(f"{rel}:{i + 1}: fn {m.group(7)} is {end - i + 1} lines "
                            f"(at most {MAX_FN_LINES})")
    for o in over:
        print(o)
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
